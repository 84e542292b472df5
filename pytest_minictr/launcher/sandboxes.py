"""The launcher's part in a sandboxed test body (see `plugin.sandbox`, `container.body`).

The body is forked by the caller, since it lives in the caller's memory; its cgroup is made,
watched, killed at the timeout and removed here, by a process the body can neither reach nor
take down with it: an OOM kill, a timeout or a body that dies hard still ends in a report
with the kernel's figures, and in nothing left behind. A kill needs no cgroup (a host may
give us none: the null backend): the body lives in a PID namespace, which the kernel kills
with its PID 1 (see `Sandbox.kill_tree`).

  {"op": "sandbox", "id", "limits", "timeout"} + fds [events]
      -> {"ok", "cgroup_procs", "init_pid"}: as root, a spare init (see `starter`) whose
         cgroup, namespaces and stage the body joins, its limits set; without root (no
         spares), a cgroup alone, and init_pid None
  {"op": "watch", "id", "pid"}  the caller's child that joined the group: its end is the
                                sandbox's end (the timeout counts from here)
At the end, one JSON line on `events`: timed_out, oom_killed, memory_peak, cpu_time,
pids_refused (forks the pids limit refused).
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from pytest_minictr.host.cgroups import Cgroup
from pytest_minictr.launcher.ends import kill

# s a spare init's end is awaited before its group is killed (see _wait_for_exit); past it,
# the group's kill goes on as before
SPARE_EXIT_WAIT = 0.1


@dataclass
class Sandbox:
    id: str
    cgroup: Cgroup
    events: int                       # the caller's pipe for the end event
    timeout: float | None
    release: Callable[[], None]       # removes the group (as root: with the spare it was)
    spare_pid: int | None = None      # as root: the spare init, PID 1 of the body's namespace
    pidfd: int | None = None          # the worker's child, once watched
    timeout_at: float | None = None
    timed_out: bool = False
    ended: bool = False
    kill_at = None                    # (read with the containers' deadlines)

    def watch(self, pid: int | None) -> bool:
        """Start watching the child; False if it is gone already (None: never forked)."""
        if pid is None:
            return False
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        if self.timeout is not None:
            self.timeout_at = time.monotonic() + self.timeout
        return True

    def time_up(self) -> None:
        self.timeout_at = None
        self.timed_out = True
        self.kill_tree()

    def kill_tree(self) -> None:
        """SIGKILL the body and everything it started, with or without a cgroup: through its
        PID namespace, which the kernel kills with its PID 1. As root that is the spare
        init, our child (not reaped before `release`: its pid is no one else's); without
        root, the init's parent: the keeper we watch, whose death kills the init
        (PR_SET_PDEATHSIG, see `container.body`). Then the cgroup, where there is one."""
        if self.spare_pid is not None:
            try:
                os.kill(self.spare_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            else:
                _wait_for_exit(self.spare_pid, SPARE_EXIT_WAIT)
        else:
            kill(self.pidfd)
        self.cgroup.kill()

    def end(self) -> None:
        """The child is gone: tell the caller what the kernel measured (first: it waits for
        this), then kill what the body left in the group and remove it."""
        if self.ended:
            return
        self.ended = True
        stats = self.cgroup.stats()
        event = {"timed_out": self.timed_out, "oom_killed": bool(stats.oom_killed),
                 "memory_peak": stats.memory_peak, "cpu_time": stats.cpu_time,
                 "pids_refused": _pids_refused(self.cgroup)}
        try:
            os.write(self.events, json.dumps(event).encode() + b"\n")
        except OSError:
            pass  # the caller closed its end: it no longer cares
        os.close(self.events)
        self.kill_tree()
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.release()


def _wait_for_exit(pid: int, timeout: float) -> None:
    """Until `pid`, a spare init killed (our child, not reaped yet), has exited, or `timeout`.
    The kernel ends a PID namespace's init only once every other process in it has exited
    and been reaped (the body by the worker, which reaps it as soon as its report is read):
    the group is empty then, and the cgroup's kill that follows finds nothing to freeze.
    Started at once, that kill froze the dying group and polled it: ~4.6 ms a body on cgroup
    v1, with the launcher answering nothing meanwhile (measured)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


def _pids_refused(cgroup: Cgroup) -> int:
    """How many forks the pids limit refused (v2 pids.events, v1 the same file), 0 if unknown."""
    for path in cgroup.paths:
        try:
            with open(os.path.join(path, "pids.events")) as events:
                for line in events:
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value)
        except OSError:
            continue
    return 0
