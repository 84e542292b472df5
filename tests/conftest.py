"""Shared fixtures: one rootfs and one runtime per session, and a check that every test leaves
the host as it found it (mounts, child processes, zombies, temp dirs)."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import pytest

from pytest_minictr import ContainerRuntime, RootfsBuilder
from pytest_minictr.host import cgroups
from pytest_minictr.plugin import layer_parent

# A run started in the background from a non-interactive shell (`nohup tox &`, some CI
# runners) inherits SIGINT ignored, and so would every process the tests start: the tests of
# Ctrl-C would then wait for an interrupt that never comes. A Ctrl-C must mean what it means at
# a terminal, here and in our children (exec resets a handled signal to its default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

BINARIES = ["sh", "echo", "cat", "ls", "sleep", "hostname", "id", "touch", "mkdir", "head",
            "readlink", "grep", "rm",
            "seq", "yes", "wc", "ln", "stat", "setsid", "true", "kill"]


def host_snapshot() -> dict[str, frozenset]:
    """What a container could leak on the host, as seen from the test process. Launchers and
    their spare inits (idle children of a launcher, with no children, forked ahead of the
    next container) are the runtimes' own, not leftovers."""
    return {
        "mounts": frozenset(line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                            .splitlines()),
        "processes": frozenset(_descendants(os.getpid())),
        # the plugin's per-test layers are the only temp dirs minictr makes: named by our pid
        "temp dirs": frozenset(p.name for p in Path(layer_parent()).iterdir()
                               if p.name.startswith(f"minictr-layer-{os.getpid()}-")),
        "cgroups": frozenset(_container_cgroups()),
    }


def _container_cgroups() -> set[str]:
    """Groups of launchers started by this process (other test runs may share the host), but
    those of idle spare inits (made ahead of need)."""
    ours = {pid for pid, (parent, _, _) in _process_table().items() if parent == os.getpid()}
    found = set()
    for parent in [*Path("/sys/fs/cgroup").glob("*/minictr"), Path("/sys/fs/cgroup/minictr")]:
        try:
            groups = [parent / name for name in os.listdir(parent)
                      if (owner := cgroups.owner_of(name)) is not None and owner.pid in ours]
        except OSError:
            continue  # no such parent, or removed while we looked
        for group in groups:
            try:
                pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
            except OSError:
                continue
            if not pids or not all(_is_launcher_child(pid) for pid in pids):
                found.add(str(group))
    return found


def _process_table() -> dict[int, tuple[int, str, str]]:
    table = {}
    for task in Path("/proc").glob("[0-9]*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        state, parent = stat[stat.rindex(")") + 2:].split()[:2]
        table[int(task.name)] = (int(parent), stat[stat.index("(") + 1:stat.rindex(")")], state)
    return table


def _descendants(root: int) -> set[str]:
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        parent, name, state = table[pid]
        idle_spare = _is_launcher(parent) and state == "S" and not children.get(pid)
        if not _is_launcher(pid) and not idle_spare:
            found.add(f"{pid} {name} {state}")
        todo.extend(children.get(pid, []))
    return found


def _is_launcher(pid: int) -> bool:
    try:
        return b"pytest_minictr.launcher.server" in Path(f"/proc/{pid}/cmdline").read_bytes() \
            and not _is_launcher_child(pid)
    except OSError:
        return False


def _is_launcher_child(pid: int) -> bool:
    """A fork of the launcher (same command line) whose parent is the launcher, or a native
    spare or zygote (`minictr-init`, see pytest_minictr.native) whose parent is one."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        launcher = Path(f"/proc/{parent}/cmdline").read_bytes()
        return launcher == command or (command.startswith(b"minictr-init\0")
                                       and b"pytest_minictr.launcher.server" in launcher)
    except OSError:
        return False


def processes_with(argument: str) -> list[str]:
    """Pids of the host's processes with `argument` among their arguments."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if argument.encode() in cmdline.read_bytes().split(b"\0"):
                found.append(cmdline.parent.name)
        except OSError:
            pass
    return found


def assert_nothing_left(before: dict, settle: float = 2.0) -> None:
    """Compare with `before`. A container's init may still be exiting (and unreaped) for a
    moment after its result was delivered, so differences get `settle` seconds to vanish."""
    deadline = time.monotonic() + settle
    while True:
        after = host_snapshot()
        extra = {key: sorted(after[key] - before[key]) for key in before}
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
    assert_nothing_left(before)


# --- what a test needs of the host: skipped, naming it, where the host lacks it -----------------
# The suite runs as root and as an ordinary user (CI's runner user): a test that needs cgroup
# limits or host root says so with a marker rather than failing for a rootless run.

@functools.cache
def limits_problem() -> str:
    """Why cgroup limits cannot be had here, as doctor says it; '' when they can."""
    from pytest_minictr.doctor.checks import Host
    return Host().cgroups()[1]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_root") and os.geteuid() != 0:
        pytest.skip("needs root (host root in a container, or another user's ids)")
    if item.get_closest_marker("needs_limits") and limits_problem():
        pytest.skip(f"needs cgroup limits, which this host denies: {limits_problem()}")
