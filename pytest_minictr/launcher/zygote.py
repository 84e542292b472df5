"""The zygote: a copy of the launcher, made once, that forks the spare inits for it.

Forking the launcher for every container costs the launcher twice: fork(2) copies its page
tables, and then every page it writes while a waiting spare still shares it is copied on the
fault: most of the launcher's CPU time a container, time in which a caller's next request
waits (docs/performance.md has the figures). The zygote is forked once,
when everything a spare inherits is ready (user namespace, seccomp program, cgroup backend,
signal dispositions); it does nothing but fork, so it writes almost no page, and the launcher,
sharing pages with nothing short-lived any more, writes to its own copies. The machine does
about as much work as before (the fork is the zygote's now, and the pages a spare writes are
copied for the spare): what changes is that none of it is on the path of a request.

Spares are forked with CLONE_PARENT (`linux.fork_as_sibling`): the launcher is their parent,
as if it had forked them itself. It reaps them and reads their wait status, and their
PR_SET_PDEATHSIG watches it, not the zygote.

A zygote that is gone (killed) costs speed, never a container: the launcher then forks its
spares itself again (`NoZygote`). Each kind answers the same calls, so that the spare pool
(see `spares`) never asks which one it has: `order` a spare and `receive` its pid, `run` a
whole plan in a new child, `close`, and whether one found gone is `replaceable`.
"""

from __future__ import annotations

import gc
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import NoReturn

from pytest_minictr import protocol
from pytest_minictr.container.child import run_plan
from pytest_minictr.container.init import ChildFds
from pytest_minictr.container.plan import Step
from pytest_minictr.errors import LauncherError
from pytest_minictr.host import linux
from pytest_minictr.host.cgroups import Cgroup


class ZygoteGone(LauncherError):
    """The zygote died or broke its socket: fork spares another way."""


class Zygote:
    """The launcher's side: the zygote's pid and our end of its socket."""

    answered = 0  # orders answered with a pid: 0 when it died, it never worked
    @property
    def replaceable(self) -> bool:
        """One found gone is not replaced: the launcher forks its spares itself, which costs
        it page copies but no container."""
        return False

    def __init__(self, parent_pidfd: int, own_pid_namespace: int, keep: tuple[int, ...],
                 prepare: Callable[[], None], spare_main: Callable[[int, str], NoReturn]):
        """`prepare()` runs once in the zygote: what every spare inherits rather than does.
        `spare_main(channel_fd, cgroup_name)` is what each spare runs; `keep`: the fds it
        needs besides those two (everything else is closed in the zygote)."""
        self.parent_pidfd = parent_pidfd
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.pid = os.fork()
            if self.pid == 0:
                serve(theirs.fileno(), parent_pidfd, own_pid_namespace, keep, prepare,
                      spare_main)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours

    def order(self, channel: int, cgroup: Cgroup) -> None:
        """Ask for a spare, PID 1 of a new PID namespace in `cgroup`, given `channel` (a copy
        of it: ours stays open). The answer comes later, in order: `receive()`."""
        try:
            protocol.send_message(self._sock, {"cgroup": cgroup.name}, [channel])
        except OSError as error:
            raise ZygoteGone(str(error)) from None

    def receive(self) -> int:
        """The pid of the spare of the oldest order not yet answered; blocks until it comes.
        OSError if that fork failed, ZygoteGone if the zygote cannot answer."""
        try:
            received = protocol.recv_message(self._sock)
        except (OSError, EOFError, ValueError) as error:
            raise ZygoteGone(str(error)) from None
        if received is None:
            raise ZygoteGone("end of its socket")
        reply, _ = received
        if "pid" not in reply:
            raise OSError(reply["errno"], reply["error"])
        self.answered += 1
        return reply["pid"]

    def run(self, steps: tuple[Step, ...], fds: ChildFds, keep: tuple[int, ...]) -> int:
        """Run a whole plan (a keeper's, an exec helper's) in a new child of ours, given the
        container's `fds` and the `keep` fds the plan names; its pid. This zygote forks spares
        only: the launcher forks the child itself."""
        return fork_to_run(steps, fds, self.parent_pidfd, keep)

    def close(self) -> None:
        """End of its socket tells the zygote to exit."""
        self._sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def serve(sock: int, parent_pidfd: int, own_pid_namespace: int, keep: tuple[int, ...],
          prepare: Callable[[], None], spare_main: Callable[[int, str], NoReturn]
          ) -> NoReturn:
    """The zygote's life: a spare for each request, until the end of `sock`."""
    code = 1
    try:
        # Freeze what we inherited: a collection would walk (and so copy) every shared page.
        gc.collect()
        gc.freeze()
        if not linux.arm_parent_death_signal(parent_pidfd):
            os._exit(1)
        linux.close_fds_except((sock, parent_pidfd, own_pid_namespace, *keep))
        prepare()
        with socket.socket(fileno=sock) as conn:
            while (received := protocol.recv_message(conn)) is not None:
                request, fds = received
                protocol.send_message(conn, _fork_spare(fds[0], request["cgroup"],
                                                        own_pid_namespace, spare_main))
        code = 0
    finally:
        os._exit(code)


def _fork_spare(channel: int, cgroup_name: str, own_pid_namespace: int,
                spare_main: Callable[[int, str], NoReturn]) -> dict:
    try:
        pid = linux.fork_into_new_pid_namespace(own_pid_namespace, linux.fork_as_sibling)
        if pid == 0:
            spare_main(channel, cgroup_name)
    except OSError as error:
        return {"error": error.strerror or str(error), "errno": error.errno or 0}
    finally:
        os.close(channel)
    return {"pid": pid}


class NoZygote:
    """No zygote (none could start, or the last one is gone and not replaced): the launcher
    forks its spares, and the children that run a whole plan, itself, with the zygote's
    calls: `order` forks the spare at once and `receive` hands over the pids in order, as a
    zygote's answers come. It is never gone."""

    answered = 0

    @property
    def replaceable(self) -> bool:
        return False  # it is never gone

    def __init__(self, parent_pidfd: int, own_pid_namespace: int, prepare: Callable[[], None],
                 spare_main: Callable[[int, str], NoReturn]):
        """`prepare()` and `spare_main(channel_fd, cgroup_name)`: what a zygote's spare
        inherits and what it runs, both run in each spare here."""
        self.parent_pidfd = parent_pidfd
        self._own_pid_namespace = own_pid_namespace
        self._prepare = prepare
        self._spare_main = spare_main
        self._forked: deque[int] = deque()

    def order(self, channel: int, cgroup: Cgroup) -> None:
        pid = linux.fork_into_new_pid_namespace(self._own_pid_namespace)
        if pid == 0:
            try:
                self._prepare()
                self._spare_main(channel, cgroup.name)
            finally:
                os._exit(1)  # a forked child never returns into the launcher
        self._forked.append(pid)

    def receive(self) -> int:
        return self._forked.popleft()

    def run(self, steps: tuple[Step, ...], fds: ChildFds, keep: tuple[int, ...]) -> int:
        return fork_to_run(steps, fds, self.parent_pidfd, keep)

    def close(self) -> None:
        pass


def fork_to_run(steps: tuple[Step, ...], fds: ChildFds, parent_pidfd: int,
                keep: tuple[int, ...]) -> int:
    """A keeper or an exec helper forked by the launcher itself, carrying out `steps`."""
    pid = os.fork()
    if pid == 0:
        run_plan(steps, fds, parent_pidfd, keep)
    return pid
