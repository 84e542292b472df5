"""The body's hidden paths on the real kernel (#27): what other processes of the host do to
them while a body starts."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from pytest_minictr.container import body_mounts
from pytest_minictr.errors import ContainerSetupError
from pytest_minictr.host import linux

SECONDS = 2.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts on the host)")


def _keep_renaming_over(path: str, seconds: float) -> int:
    """As useradd does to /etc/shadow: a new file renamed over the old, again and again."""
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with open(path + "+", "w") as new:
                new.write("root:*:1::::::\n")
            os.rename(path + "+", path)
        os._exit(0)
    return pid


def _hide_again_and_again(path: str, seconds: float) -> int:
    """In a child with a private mount namespace (the stage's paths are the host's here):
    exits 0 if every hiding mount was made, 1 at the first that failed."""
    pid = os.fork()
    if pid == 0:
        status = 2
        try:
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            body_mounts.ROOT = body_mounts.HOST = ""
            end = time.monotonic() + seconds
            status = 0
            while time.monotonic() < end and status == 0:
                with contextlib.suppress(OSError):  # (renamed over since: not a mount point)
                    linux.umount2(path, linux.MNT_DETACH)
                try:
                    body_mounts.hide_host_path(path)
                except ContainerSetupError:
                    status = 1
        finally:
            os._exit(status)
    return pid


def test_a_file_renamed_over_while_it_is_hidden_is_hidden_all_the_same(tmp_path):
    shadow = str(tmp_path / "shadow")
    open(shadow, "w").close()
    renamer = _keep_renaming_over(shadow, SECONDS + 1)
    try:
        hider = _hide_again_and_again(shadow, SECONDS)
        assert os.waitstatus_to_exitcode(os.waitpid(hider, 0)[1]) == 0
    finally:
        os.waitpid(renamer, 0)
