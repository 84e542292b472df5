"""An ordinary account runs an image of its own (issue #29, item 7): layers it owns, in the
form overlayfs reads in a user namespace (`userxattr`, Linux 5.11): a whiteout is a 0/0
character device, which any user may make since Linux 5.8, and an opaque directory carries
user.overlay.opaque=y (trusted.* is out of its reach). Run as a real account made with
useradd, its own pytest over its own test file."""

from __future__ import annotations

import textwrap

from tests.unprivileged import account_fixture, place_with_tests

ROOTLESS = '''
import os
import shutil
import stat

from pytest_minictr import ContainerRuntime, RootfsBuilder
from pytest_minictr.images.image import Image, ImageConfig

SCRIPT = "id -u; ls /srv; ls /opt/old; cat /srv/kept.txt; touch /srv/new; cat /etc/hostname"


def test_an_account_runs_an_image_of_its_own(tmp_path):
    base = RootfsBuilder(cache_dir=tmp_path / "cache").build(
        binaries=["sh", "cat", "ls", "id", "touch"])
    bottom, top = tmp_path / "store" / "bottom", tmp_path / "store" / "top"
    shutil.copytree(base, bottom, symlinks=True)
    (bottom / "srv").mkdir()
    (bottom / "srv" / "gone.txt").write_text("deleted above")
    (bottom / "srv" / "kept.txt").write_text("kept\\n")
    (bottom / "opt" / "old").mkdir(parents=True)
    (bottom / "opt" / "old" / "a.txt").write_text("hidden")
    (top / "srv").mkdir(parents=True)
    (top / "opt" / "old").mkdir(parents=True)
    os.mknod(top / "srv" / "gone.txt", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(top / "opt" / "old", "user.overlay.opaque", b"y")
    (top / "opt" / "old" / "b.txt").write_text("b")
    image = Image("local/app:1", "sha256:" + "0" * 64, (bottom, top),
                  ImageConfig(entrypoint=("sh", "-c"), cmd=(SCRIPT,)))
    with ContainerRuntime() as runtime:
        result = runtime.run(image, None, hostname="mine").wait()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"0", b"kept.txt", b"b.txt", b"kept", b"mine"]
    assert sorted(os.listdir(top / "srv")) == ["gone.txt"]
    assert not (bottom / "srv" / "new").exists()
'''

account = account_fixture("mcimg")


def test_an_account_runs_an_image_of_its_own(account):
    source = textwrap.dedent(ROOTLESS)
    with place_with_tests(account, "minictr-image-rootless-", source) as (runner, place, tests):
        done = runner("-m", "pytest", "-p", "no:cacheprovider", "-rA",
                      f"--basetemp={place}/home/tmp", str(tests), cwd=tests)
        assert "PASSED test_mine.py::test_an_account_runs_an_image_of_its_own" in done.stdout, \
            done.stdout[-3000:] + done.stderr[-2000:]
