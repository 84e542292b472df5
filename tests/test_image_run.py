"""Containers run from an image (issue #29): its layer directories stacked by overlay under
the container's writable layer, never copied nor written; its config applied by Docker's
rules; what the store and the rootfs cache hold refused to a writable bind.

The image here is made of two layer directories built from this host's binaries, in the
form the store keeps them (overlayfs' own: a whiteout is a 0/0 character device, an opaque
directory has trusted.overlay.opaque=y), until the store itself can pull one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_minictr import ConfigError, ContainerRuntime, Mount, immutable
from pytest_minictr.images.image import Image, ImageConfig

from .image_layers import make_layers


def tree_of(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.lstat().st_mode, p.lstat().st_mtime_ns)
            for p in path.rglob("*")}


@pytest.fixture(scope="module")
def store(tmp_path_factory, rootfs) -> Path:
    place = tmp_path_factory.mktemp("store")
    immutable.mark(place)
    make_layers(place, rootfs)
    return place


@pytest.fixture(scope="module")
def image(store) -> Image:
    config = ImageConfig(
        env=("PATH=/bin:/usr/bin:/sbin:/usr/sbin", "GREETING=hello", "EMPTY"),
        entrypoint=("sh", "-c"), cmd=('echo "$GREETING from $(pwd) as $(id -u):$(id -g)"',),
        working_dir="/app", user="app:staff", stop_signal="SIGUSR1")
    return Image("example.org/test/app:1", "sha256:" + "0" * 64,
                 (store / "layers" / "bottom", store / "layers" / "top"), config)


def idmappable(path: Path) -> bool:
    """Whether this kernel can idmap a mount of `path`'s filesystem (tmpfs: from 6.3)."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()
    release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    return kind != "tmpfs" or release >= (6, 3)


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("user", [True, False])
def test_a_container_sees_the_layers_as_overlayfs_stacks_them(image, store, monkeypatch,
                                                               native, user):
    if user and not idmappable(store):
        pytest.skip("container root writes over an image's files through an idmapped mount "
                    f"of each layer: tmpfs allows one from Linux 6.3, this is "
                    f"{os.uname().release} and the test's store is on tmpfs")
    monkeypatch.setenv("MINICTR_NATIVE", native)  # the launcher started below reads it
    before = tree_of(store)
    with ContainerRuntime() as runtime:
        result = runtime.run(image, ["cat /srv/new.txt /srv/kept.txt; ls /srv; ls /opt/old; "
                                     "echo changed > /srv/kept.txt; rm /srv/new.txt; "
                                     "touch /opt/old/c.txt /bin/planted; cat /srv/kept.txt"],
                             user=user, run_as=0).wait()
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == [
        "from", "the", "top", "layer", "from", "the", "bottom", "layer",
        "kept.txt", "new.txt",   # gone.txt: the whiteout deleted it
        "b.txt",                 # a.txt: under the opaque directory
        "changed"]
    assert tree_of(store) == before  # the writes went to the container's layer only


@pytest.mark.parametrize("native", ["1", "0"])
def test_hostname_and_hosts_are_given_over_the_image_files(image, store, monkeypatch, native):
    monkeypatch.setenv("MINICTR_NATIVE", native)
    before = tree_of(store)
    with ContainerRuntime() as runtime:
        result = runtime.run(image, ["cat /etc/hostname /etc/hosts"], hostname="box",
                             read_only=True).wait()
    assert result.stdout.decode().splitlines() == [
        "box", "127.0.0.1\tlocalhost box", "::1\tlocalhost ip6-localhost ip6-loopback box"]
    assert tree_of(store) == before
    assert (store / "layers" / "top" / "etc" / "hosts").read_text() == "10.9.8.7\tthe-image-own\n"


def test_an_image_symlink_keeps_its_own_file(runtime, image, tmp_path):
    link = tmp_path / "layer"
    (link / "etc").mkdir(parents=True)
    (link / "etc" / "hostname").symlink_to("/srv/new.txt")
    linked = Image(image.reference, image.digest, (*image.layers, link), image.config)
    result = runtime.run(linked, ["cat", "/etc/hostname"], entrypoint=[]).wait()
    assert result.stdout == b"from the top layer\n", result.stderr


def test_the_image_config_applies(runtime, image):
    result = runtime.run(image, None).wait()
    assert (result.returncode, result.stdout) == (0, b"hello from /app as 1234:4321\n"), \
        result.stderr


def test_a_command_replaces_cmd_and_keeps_the_entrypoint(runtime, image):
    result = runtime.run(image, ['echo "$GREETING [$EMPTY] $PATH"'],
                         env={"GREETING": "overridden"}).wait()
    assert result.stdout == b"overridden [] /bin:/usr/bin:/sbin:/usr/sbin\n", result.stderr


def test_an_entrypoint_given_replaces_both(runtime, image):
    assert runtime.run(image, None, entrypoint=["echo", "only"]).wait().stdout == b"only\n"
    assert runtime.run(image, ["one", "two"], entrypoint="echo").wait().stdout == b"one two\n"
    with pytest.raises(ConfigError, match="no Entrypoint or Cmd: give a command"):
        runtime.run(image, None, entrypoint="")


def test_an_entrypoint_on_a_rootfs_is_refused(runtime, rootfs):
    with pytest.raises(ConfigError, match="entrypoint= replaces an image's Entrypoint"):
        runtime.run(rootfs, ["true"], entrypoint="echo")


def test_cwd_and_run_as_given_beat_the_image(runtime, image):
    result = runtime.run(image, ['pwd; id -u; echo "$HOME"'], cwd="/srv", run_as=99).wait()
    assert result.stdout == b"/srv\n99\n/\n", result.stderr


def test_home_is_the_users_unless_set(runtime, image):
    assert runtime.run(image, ['echo "$HOME"']).wait().stdout == b"/app\n"
    assert runtime.run(image, ['echo "$HOME"'], run_as=0).wait().stdout == b"/root\n"
    assert runtime.run(image, ['echo "$HOME"'], env={"HOME": "/x"}).wait().stdout == b"/x\n"


def test_a_bad_image_config_is_a_clear_error(runtime, image):
    for config, message in ((ImageConfig(cmd=("true",), env=("A=b\0c",)), "the image's Env"),
                            (ImageConfig(cmd=("true",), working_dir="app"), "WorkingDir"),
                            (ImageConfig(cmd=("true",), stop_signal="SIGNOPE"), "StopSignal"),
                            (ImageConfig(cmd=("true",), stop_signal="19"), "StopSignal '19'")):
        with pytest.raises(ConfigError, match=message):
            runtime.run(Image(image.reference, image.digest, image.layers, config), None)


@pytest.mark.parametrize("user, ids", [("app", "1234:2345"), ("1234", "1234:2345"),
                                       ("77", "77:0"), ("77:staff", "77:4321"),
                                       ("app:5", "1234:5")])
def test_the_image_user_is_looked_up_in_its_own_files(runtime, image, user, ids):
    config = ImageConfig(entrypoint=("sh", "-c"), cmd=('echo "$(id -u):$(id -g)"',), user=user)
    result = runtime.run(Image(image.reference, image.digest, image.layers, config), None).wait()
    assert result.stdout.decode() == ids + "\n", result.stderr


def test_an_unknown_image_user_is_a_clear_error(runtime, image):
    config = ImageConfig(cmd=("true",), user="nobody-here")
    with pytest.raises(ConfigError, match="no account 'nobody-here' in its /etc/passwd"):
        runtime.run(Image(image.reference, image.digest, image.layers, config), None)


@pytest.mark.parametrize("text, number", [("SIGQUIT", 3), ("int", 2), ("15", 15)])
def test_a_stop_signal_is_read_as_docker_writes_it(text, number):
    from pytest_minictr.images.apply import signal_number
    assert signal_number(text) == number


def test_stop_sends_the_image_stop_signal(runtime, image):
    container = runtime.run(image, ["trap 'echo got it; exit 7' USR1; echo ready; "
                                    "while :; do sleep 0.1; done"])
    container.wait_for_output(rb"ready", timeout=10)
    result = container.stop(grace=10)
    assert (result.returncode, result.stdout) == (7, b"ready\ngot it\n"), result.stderr
    assert container.spec.stop_signal == signal.SIGUSR1


@pytest.mark.parametrize("where", ["store", "cache"])
def test_a_writable_bind_of_a_shared_tree_is_refused(runtime, rootfs, store, where):
    source = store / "layers" / "top" / "srv" if where == "store" else rootfs / "bin"
    with pytest.raises(ConfigError, match=r"writable bind of .* shares"):
        runtime.run(rootfs, ["true"], user=False,
                    mounts=[Mount.bind(source, "/mnt", read_only=False)])
    result = runtime.run(rootfs, ["ls", "/mnt"],
                         mounts=[Mount.bind(source, "/mnt", read_only=True)]).wait()
    assert result.returncode == 0, result.stderr


class FakeStore:
    """The store's interface (`images.store`, `images.pull`): `Store().lookup(ref)`,
    `pull(ref)`."""

    def __init__(self, images: dict[str, Image]):
        self.images, self.pulled = images, []

    def lookup(self, reference: str) -> Image | None:
        return self.images.get(reference) if reference not in self.pulled else None

    def pull(self, reference: str) -> Image:
        self.pulled.append(reference)
        return self.images[reference]


@pytest.fixture
def fake_store(monkeypatch, image):
    store = FakeStore({"app:1": image})
    monkeypatch.setattr("pytest_minictr.images.store.Store", lambda: store)
    monkeypatch.setattr("pytest_minictr.images.pull.pull", store.pull)
    return store


def test_a_reference_is_looked_up_and_pulled_as_pull_says(runtime, fake_store):
    assert runtime.run("app:1", ["cat", "/srv/new.txt"], entrypoint=[]).wait().stdout \
        == b"from the top layer\n"
    assert fake_store.pulled == []
    runtime.run("app:1", ["true"], pull="always").wait()
    assert fake_store.pulled == ["app:1"]
    with pytest.raises(ConfigError, match="'other:2' is not in the store, and pull='never'"):
        runtime.run("other:2", ["true"], pull="never")
    with pytest.raises(ConfigError, match="pull='sometimes': expected one of missing, always"):
        runtime.run("app:1", ["true"], pull="sometimes")


def test_a_path_is_never_taken_for_a_reference(runtime, tmp_path):
    with pytest.raises(ConfigError, match="rootfs does not exist"):
        runtime.run(str(tmp_path / "missing"), ["true"])
    with pytest.raises(ConfigError, match="rootfs does not exist"):
        runtime.run(tmp_path / "missing", ["true"])


def run_cli(capsys, *argv: str) -> tuple[int, dict]:
    from pytest_minictr.cli.main import main
    status = main(["run", "--json", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return status, json.loads(out[-1]) if out else {}


@pytest.fixture
def no_stdin(monkeypatch):
    with open(os.devnull) as null:
        monkeypatch.setattr(sys, "stdin", null)
        yield


def test_minictr_run_takes_an_image_as_docker_spells_it(fake_store, capsys, no_stdin):
    status, report = run_cli(capsys, "app:1")
    assert (status, report["stdout"]) == (0, "hello from /app as 1234:4321\n"), report
    status, report = run_cli(capsys, "-e", "GREETING=hi", "app:1", "--", 'echo "$GREETING"')
    assert report["stdout"] == "hi\n", report
    status, report = run_cli(capsys, "--entrypoint", "cat", "app:1", "/srv/new.txt")
    assert report["stdout"] == "from the top layer\n", report
    status, report = run_cli(capsys, "--pull", "never", "other:2", "true")
    assert status == 125 and "pull='never'" in report["error"], report


def test_a_detached_container_runs_on_the_image(fake_store, capsys, no_stdin, tmp_path,
                                                monkeypatch):
    from pytest_minictr.cli.main import main
    monkeypatch.setenv("MINICTR_STATE_DIR", str(tmp_path / "state"))  # not the host's
    assert main(["run", "-d", "app:1", 'echo "$GREETING"; exit 3']) == 0
    container_id = capsys.readouterr().out.strip()
    try:
        assert main(["wait", container_id]) == 0
        assert capsys.readouterr().out == "3\n"
        assert main(["logs", container_id]) == 0
        assert capsys.readouterr().out == "hello\n"
        assert main(["ps", "--all"]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines()
                   if line.startswith(container_id))
        assert row.split()[2] == "app:1"  # the reference as given, not the top layer's path
    finally:
        main(["rm", "-f", container_id])
