"""Small helpers shared by the tests: waits for processes that come and go, and a skip for
tests whose unprivileged user could not reach the checkout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pytest_minictr import UnsupportedError
from pytest_minictr.host import cgroups

REPO = Path(__file__).resolve().parent.parent


def eventually(predicate, timeout: float = 10.0) -> bool:
    """Whether `predicate()` came true within `timeout` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def process_gone(pid: int | None) -> bool:
    """No such process runs (a zombie waiting for its parent runs no more)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def skip_unless_others_reach_the_checkout() -> None:
    """Skips a test whose unprivileged user could not reach this checkout (a home of 0700)."""
    closed = [str(d) for d in [REPO, *REPO.parents] if not os.stat(d).st_mode & 0o001]
    if closed:
        pytest.skip(f"an unprivileged user cannot reach this checkout ({closed[0]} is closed)")


def launcher_of(pid: int) -> int:
    """The minictr launcher above `pid` (a container's init: its child as root, its keeper's
    without root)."""
    while pid > 1:
        if b"pytest_minictr.launcher.server" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
    raise LookupError("no minictr launcher above it")


def command_of(init: int) -> int | None:
    """The pid of a container's command (its init's child), once the init has spawned it."""
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    return int(children[0]) if children else None


@pytest.fixture(scope="module", autouse=True)
def need_cgroups():
    try:
        cgroups.detect(prepare=False)
    except UnsupportedError as problem:
        pytest.skip(f"no usable cgroups here: {problem}")
