"""Images wherever the plugin takes a rootfs (issue #29): `--minictr-image` (ini
`minictr_image`) for the fixture's containers, `@pytest.mark.container(image=...)`,
`minictr_service(image=..., ports=...)` with the image's ExposedPorts as the default.

The tests' pytest runs in a subprocess whose conftest stands a small store in for the image
store (its interface: `Store().lookup(ref)`, `pull(ref)`), over layers built here."""

from __future__ import annotations

import textwrap

import pytest

from .image_layers import make_layers

pytest_plugins = ["pytester"]

STORE = '''
import os
from pathlib import Path
from pytest_minictr.images.image import Image, ImageConfig

LAYERS = tuple(Path(p) for p in os.environ["TEST_IMAGE_LAYERS"].split(":"))

class Store:
    def lookup(self, reference):
        if not reference.startswith("app"):
            return None
        config = ImageConfig(env=("GREETING=" + reference,), working_dir="/app",
                             cmd=("sh",), exposed_ports=(8080, 9090))
        return Image(reference, "sha256:" + "0" * 64, LAYERS, config)

def pull(reference):
    raise LookupError(f"{reference} is nowhere")

import pytest_minictr.images.pull
import pytest_minictr.images.store
pytest_minictr.images.store.Store, pytest_minictr.images.pull.pull = Store, pull
'''

TESTS = '''
import pytest

def test_the_option_names_the_default_image(container):
    result = container.run('pwd; cat /srv/new.txt; echo "$GREETING"')
    assert result.stdout == b"/app\\nfrom the top layer\\napp:1\\n", result.stderr

@pytest.mark.container(image="app:2")
def test_the_marker_names_another(container):
    assert container.run('echo "$GREETING"').stdout == b"app:2\\n"

@pytest.mark.container(binaries=["sh", "cat"])
def test_the_marker_binaries_beat_the_default_image(container):
    assert container.run("cat /srv/new.txt").returncode != 0

@pytest.mark.container(image="app:1", rootfs="/")
def test_two_sources_are_refused(container):
    pass

def test_a_service_publishes_the_exposed_ports(minictr_service):
    service = minictr_service(image="app:1", command=["sh", "-c", "echo up; sleep 60"],
                              wait_for_output=rb"up")
    assert sorted(service.published) == [8080, 9090]
    only = minictr_service(image="app:1", command=["sleep", "60"], ports=[8080])
    assert sorted(only.published) == [8080]
'''


@pytest.fixture(scope="module")
def layers(tmp_path_factory, rootfs) -> str:
    bottom, top = make_layers(tmp_path_factory.mktemp("plugin-store"), rootfs)
    return f"{bottom}:{top}"


def test_images_in_the_fixture_the_marker_and_services(pytester, cache_dir, layers,
                                                       monkeypatch):
    monkeypatch.setenv("TEST_IMAGE_LAYERS", layers)
    pytester.makeconftest(STORE)
    pytester.makepyfile(test_user=textwrap.dedent(TESTS))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers",
                                           f"--minictr-cache-dir={cache_dir}",
                                           "--minictr-image=app:1")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*give one of image=, rootfs= or binaries=/recipe=, "
                                 "not image= and rootfs=*"])
