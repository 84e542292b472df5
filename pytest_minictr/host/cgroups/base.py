"""What every cgroup backend offers: the interface (`CgroupBackend`, `Cgroup`, `CgroupStats`).

Contract: a `CgroupBackend` (picked once per process by `cgroups.detect()`) creates one
`Cgroup` per container; the caller joins the container's first process to it, reads
`stats()`, `kill()`s the whole tree and `remove()`s it. Callers never ask which cgroup version
they are on. The steps on files that v1 and v2 share are in `files`; the groups' names in
`names`; what dead launchers left is reaped by `reaping`.
"""

from __future__ import annotations

import abc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pytest_minictr.errors import MinictrError
from pytest_minictr.spec import Limits

from .files import (
    is_zombie,
    kill_listed,
    list_processes,
    remove_group_dir,
    wait_until,
    write_raw,
    write_value,
)
from .reaping import FOREIGN_GRACE, reap_orphans

CPU_PERIOD_US = 100_000          # cpus=0.25 -> 25 000 us of CPU every 100 000 us
KILL_TIMEOUT = 2.0               # seconds kill() keeps killing until the group is empty
FREEZE_TIMEOUT = 0.5             # seconds we wait for a freezer to report "frozen"

# Mount options of a v1 hierarchy that name the controllers we use; anything else in the
# options (rw, relatime, name=systemd, clone_children...) is not a controller we care about.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
LIMIT_CONTROLLERS = (("memory", "memory"), ("cpus", "cpu"), ("pids", "pids"))  # Limits field
V2_CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class CgroupStats:
    """What the kernel measured for a container's cgroup; None where this host cannot tell."""

    memory_peak: int | None = None     # bytes, highest usage seen
    memory_current: int | None = None  # bytes in use now
    cpu_time: float | None = None      # seconds of CPU, user + system, all processes
    oom_killed: bool | None = False    # the OOM killer killed something in the group
    pids_current: int | None = None    # tasks counted now (zombies included)


class Cgroup(abc.ABC):
    """One container's group, in one directory per hierarchy (v2: one; v1: one per mount)."""

    def __init__(self, name: str, paths: tuple[str, ...]):
        self.name = name
        self.paths = paths         # every directory of the group, for messages and checks

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {list(self.paths)}>"

    def join(self, pid: int) -> None:
        """Move `pid` into the group in every hierarchy. The container's first child calls this
        with its own pid before it unshares or execs, so it never runs unlimited."""
        for path in self.paths:
            try:
                write_raw(os.path.join(path, "cgroup.procs"), pid)
            except OSError as e:
                raise MinictrError(f"cannot move pid {pid} into cgroup {path}: "
                                   f"{e.strerror}") from e

    @abc.abstractmethod
    def apply_limits(self, limits: Limits) -> None:
        """Set `limits` (the backend's check_limits() has passed); None leaves one as it is.
        Works with processes inside: a spare init joins its group before its spec is known."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """What the kernel measured; still readable after every process has exited."""

    def cpu_usage(self) -> float | None:
        """CPU seconds the group has used so far, every process of it (the dead included):
        one file read, cheap enough for the launcher to poll (see launcher.cpu_watch)."""
        return self.stats().cpu_time

    def processes(self) -> set[int]:
        """Live pids in the group (all hierarchies, child groups included; zombies left out,
        they hold no resources and only their parent can make them go)."""
        pids: set[int] = set()
        for path in self.paths:
            pids |= list_processes(path)
        return {pid for pid in pids if not is_zombie(pid)}

    def kill(self) -> None:
        """SIGKILL every process in the group and return once none is left (or after
        KILL_TIMEOUT, e.g. a task stuck in uninterruptible sleep: remove() then reports it).

        Nothing escapes by forking: each round either uses the kernel's own group kill or kills
        a frozen group, and rounds repeat until the group lists no live process.
        """
        deadline = time.monotonic() + KILL_TIMEOUT
        while self.processes():
            if time.monotonic() >= deadline:
                return
            self._kill_round()
            # SIGKILL is delivered at once but exit (freeing memory, closing files) takes a
            # moment; only start another round if the group is still not empty by then.
            wait_until(lambda: not self.processes(), min(0.1, max(0, deadline - time.monotonic())))

    @abc.abstractmethod
    def _kill_round(self) -> None:
        """Kill every process in the group once, leaving no window for a fork to escape."""

    def _kill_frozen(self, freezer: str, frozen: str | int, thawed: str | int,
                     is_frozen: Callable[[], bool]) -> None:
        """Kill the group's processes while it is frozen: a frozen group cannot fork, so the
        list we kill is complete, and the kills take effect when we thaw. Freezing is
        asynchronous (a task is only frozen once it leaves the kernel): wait for it."""
        write_value(freezer, frozen)
        try:
            wait_until(is_frozen, FREEZE_TIMEOUT)
            kill_listed(self.processes(), self.processes)
        finally:
            write_value(freezer, thawed)

    def remove(self) -> None:
        """rmdir the group in every hierarchy, retrying EBUSY briefly. Idempotent."""
        for path in self.paths:
            remove_group_dir(path)

    def discard(self) -> None:
        """Remove the group, killing what is still in it if it will not go; never raises.

        Called when a container has ended or a group is undone half-made, often while another
        error is on its way up: a group that still will not go (a task stuck in the kernel)
        must neither take the launcher down nor hide that error. It is reported, and the next
        launcher's reap_stale() tries again."""
        try:
            self.remove()
        except MinictrError:
            try:
                self.kill()
                self.remove()
            except MinictrError as error:
                print(f"minictr: {error}", file=sys.stderr)


class CgroupBackend(abc.ABC):
    """One cgroup version on this host: makes containers' groups, reaps stale ones."""

    name: str = ""
    problem: str | None = None  # why this host gives us no cgroups (the null backend only)

    def __init__(self, parent_dirs: tuple[str, ...]):
        self.parent_dirs = parent_dirs     # our `minictr` directory in each hierarchy

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {list(self.parent_dirs)}>"

    @abc.abstractmethod
    def check_limits(self, limits: Limits) -> None:
        """UnsupportedError if a limit needs a controller this host does not offer us."""

    def cpu_usage_problem(self) -> str | None:
        """Why this host's groups cannot count their CPU time (so no cpu_time_limit); None
        where they can."""
        return None

    @abc.abstractmethod
    def create(self, name: str, limits: Limits) -> Cgroup:
        """Create the group `name` (see `group_name()`) with `limits` applied; raises
        UnsupportedError if a limit needs a controller this host does not offer."""

    @abc.abstractmethod
    def open(self, name: str) -> Cgroup:
        """The group `name` as it exists now (for kill/remove of a group we did not create)."""

    def release(self) -> None:
        """Remove our `minictr` parents if no launcher has a group in them any more (rmdir
        refuses a non-empty one), so that a host where no container runs holds nothing of
        ours. A launcher creating a group at the same moment makes its parent again."""
        for parent in self.parent_dirs:
            try:
                os.rmdir(parent)
            except OSError:
                pass

    def reap_stale(self, grace: float = FOREIGN_GRACE) -> list[str]:
        """Kill and remove the groups whose owner launcher is dead; returns their names (see
        `reaping`: groups of live launchers, and of other PID namespaces', are left alone)."""
        return reap_orphans(self.parent_dirs, self.open, grace)
