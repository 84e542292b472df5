"""Shared fixtures: one rootfs and one runtime per session, and a check that every test leaves
the host as it found it (mounts, child processes, zombies, temp dirs)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from pytest_minictr import ContainerRuntime, RootfsBuilder

BINARIES = ["sh", "echo", "cat", "ls", "sleep", "hostname", "id", "touch", "mkdir", "head",
            "seq", "yes", "wc", "ln", "stat", "setsid", "true", "kill"]


def host_snapshot() -> dict[str, frozenset]:
    """What a container could leak on the host, as seen from the test process."""
    return {
        "mounts": frozenset(line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                            .splitlines()),
        "children": frozenset(_children(os.getpid())),
        "temp dirs": frozenset(p.name for p in Path(tempfile.gettempdir()).iterdir()
                               if "minictr" in p.name and "bench" not in p.name),
    }


def _children(pid: int) -> set[str]:
    """Descendants of `pid` (minus the runtime's launcher), with their state."""
    found = set()
    for task in Path("/proc").glob("[0-9]*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.add(f"{task.name} {stat[stat.index('(') + 1:stat.rindex(')')]} {fields[0]}")
            found |= _children(int(task.name))
    return found


def assert_nothing_left(before: dict, runtime: ContainerRuntime | None = None,
                        settle: float = 2.0) -> None:
    """Compare with `before`. A container's init may still be exiting (and unreaped) for a
    moment after its result was delivered, so differences get `settle` seconds to vanish."""
    launcher = str(runtime._client.pid) if runtime is not None and runtime._client.pid else None
    deadline = time.monotonic() + settle
    while True:
        after = host_snapshot()
        extra = {key: sorted(item for item in after[key] - before[key]
                             if not (launcher and item.split()[0] == launcher))
                 for key in before}
        if not any(extra.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not any(extra.values()), f"left behind: {extra}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def rootfs(cache_dir) -> Path:
    return RootfsBuilder(cache_dir=cache_dir).build(binaries=BINARIES)


@pytest.fixture(scope="session")
def runtime():
    with ContainerRuntime() as shared:
        yield shared


@pytest.fixture
def no_leftovers(runtime):
    """Fails the test if it left a mount, a process or a temp dir on the host."""
    before = host_snapshot()
    yield
    assert_nothing_left(before, runtime)
