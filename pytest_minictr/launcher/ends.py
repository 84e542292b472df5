"""What the launcher does when a container (or an exec) ends: it reads the init's end report
from the status pipe, moves the container's life to its end, takes the cgroup's figures, sends
the end event on the caller's event pipe (one JSON line: returncode, how it ended, wall and CPU
time, memory peak, OOM kill), lets the container's pod know, and, once our child is reaped,
removes the cgroup and forgets the container. And how an end we make (a timeout, a stop, our
own shutdown) kills a container's whole tree, with or without cgroups (`kill_all`)."""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import time

from pytest_minictr.host import linux
from pytest_minictr.launcher.life import ENDED_BY, WE_KILLED, Container, Happening
from pytest_minictr.launcher.pods import Pods


class Ends:
    """The handlers the launcher's loop calls when a container's status pipe or pidfd is
    readable; they share its selector, its table of containers and its pods."""

    def __init__(self, selector: selectors.BaseSelector, containers: dict[str, Container],
                 pods: Pods):
        self.selector = selector
        self.containers = containers
        self.pods = pods

    def on_status(self, container: Container) -> None:
        """The init writes the command's status once the command and everything it left
        behind are dead and reaped: the container's end, told to the caller at once (the
        init's own exit, and the namespaces' teardown, need not hold the caller up)."""
        if container.status_pipe is None:
            return  # on_exit, in the same round of events, already read it to the end
        chunk = os.read(container.status_pipe, 65536)
        container.take_status(chunk)
        if not chunk:
            self._close_status_pipe(container)
        if not chunk or container.report.command_ended:
            self._send_event(container)

    def on_exit(self, container: Container) -> None:
        """Our child exited: the init and every process of the namespace are gone."""
        self.selector.unregister(container.pidfd)
        _, child_status = os.waitpid(container.pid, 0)
        if container.status_pipe is not None:
            # every writer has exited, so this read cannot block
            while chunk := os.read(container.status_pipe, 65536):
                container.take_status(chunk)
            container.take_status(b"")
            self._close_status_pipe(container)
        container.report = container.report.with_child_status(child_status)
        self._send_event(container)
        linux.close_each((container.pidfd, container.init_pidfd, *container.held))
        container.cgroup.discard()
        del self.containers[container.id]

    def _send_event(self, container: Container) -> None:
        if container.ended:
            return
        life = container.advance(Happening.END_TOLD)
        report = container.report
        returncode = report.returncode
        ended_by = None if life in WE_KILLED and returncode >= 0 else ENDED_BY[life]
        event = {"returncode": returncode, "ended_by": ended_by,
                 "wall_time": time.monotonic() - container.started,
                 **measurements(container, report.cpu_time)}
        self.pods.leave(container.id)
        try:
            os.write(container.events, json.dumps(event).encode() + b"\n")
        except OSError:
            pass  # the caller closed its end: it no longer cares
        os.close(container.events)

    def _close_status_pipe(self, container: Container) -> None:
        if container.status_pipe is not None:
            self.selector.unregister(container.status_pipe)
            os.close(container.status_pipe)
            container.status_pipe = None


def measurements(container: Container, reaped_cpu_time: float | None) -> dict:
    """What the kernel measured. CPU time is the init's count of the command and everything it
    started (all reaped by then), which leaves out our own setup; the cgroup's count, which
    includes it, stands in where the init could not report (killed at a timeout), less that
    setup where a CPU-time limit made us take its count at the start."""
    stats = container.cgroup.stats()
    cpu_time = stats.cpu_time if container.cpu_watch is None \
        else container.cpu_watch.since_start(stats.cpu_time)  # (one read of the count)
    return {"cpu_time": cpu_time if reaped_cpu_time is None else reaped_cpu_time,
            "memory_peak": stats.memory_peak, "oom_killed": stats.oom_killed}


def kill_all(container: Container) -> None:
    """SIGKILL the container's whole tree, whether or not this host gives us cgroups (the null
    backend's kill does nothing): its init, whose death makes the kernel kill its PID
    namespace; for an exec, which shares the container's namespace and cgroup (neither bounds
    it), its command's process group (the command is a session leader: what it starts stays
    in its group unless it leaves it, and then ends with the container). Then, through the
    cgroup, anything that could have left the namespace's reach."""
    if container.command_group is not None and container.init_pidfd is not None \
            and not _has_exited(container.init_pidfd):
        # only while the command lives: its pid, the group's number, is then no one else's
        _kill_group(container.command_group)
    kill(container.init_pidfd)
    container.cgroup.kill()


def kill(pidfd: int | None, signum: int = signal.SIGKILL) -> None:
    """Signal through a pidfd: never a recycled pid."""
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _has_exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])
