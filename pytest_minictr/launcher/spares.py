"""The spare pool, in the launcher process: inits forked ahead of need, and whatever forks the
launcher's children (the native zygote, the Python one, or the launcher itself: see `zygote`).

What a container needs before its spec is known is done ahead, by spare inits that the
launcher makes while it has nothing else to do: the fork, the namespaces, the signal handlers,
the mounts that do not depend on the spec (see `mounts`), and joining a cgroup. That last one
matters most: moving a task between cgroups waits for an RCU grace period (per
hierarchy: five of them on cgroup v1), which a spare pays in its own time. A
container then only costs what its spec decides.

Spares are ordered from the zygote and their pids received later, in order; the pool never
asks which zygote it has (a gone one says itself whether it is `replaceable`).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NoReturn

from pytest_minictr.container import plan
from pytest_minictr.container.child import run_spare
from pytest_minictr.container.init import ChildFds, SignalProxy
from pytest_minictr.container.plan import Where
from pytest_minictr.errors import LauncherError, MinictrError
from pytest_minictr.host import linux
from pytest_minictr.host.cgroups import Cgroup, CgroupBackend
from pytest_minictr.launcher.native import NativeZygote
from pytest_minictr.launcher.zygote import NoZygote, Zygote, ZygoteGone
from pytest_minictr.spec import Limits

SPARE_READY_TIMEOUT = 60.0  # seconds a spare may take to build its namespaces and stage


@dataclass(frozen=True)
class Spare:
    """An init forked ahead of need: in its own cgroup and its own PID, mount, UTS, IPC and
    network namespaces, waiting on `channel` for a spec and the container's descriptors."""

    pid: int
    channel: socket.socket
    cgroup: Cgroup


class SparePool:
    """The spares made ahead of need, and the zygote that forks them (and, native, the
    keepers and exec helpers too)."""

    SPARES = 2  # enough to cover a burst of starts while the next spare joins its cgroup

    def __init__(self, *, own_pidfd: int, own_pid_namespace: int, userns_fds: tuple[int, ...],
                 where: Where, cgroups: CgroupBackend, new_cgroup: Callable[[Limits], Cgroup],
                 native_program: str | None, rootless: bool):
        """Made last of the launcher's parts: the zygote is a copy of the launcher as it is
        now, and each spare a copy of it. `where`: what a plan needs to know of us, but its
        cgroup; `new_cgroup`: the launcher's groups are named in one series."""
        self.own_pidfd = own_pidfd
        self.own_pid_namespace = own_pid_namespace
        self.userns_fds = userns_fds
        self.where = where
        self.cgroups = cgroups
        self.new_cgroup = new_cgroup
        self.native_program = native_program
        self.rootless = rootless
        self.spares: deque[Spare] = deque()
        # spares asked of the zygote, not yet answered: our end of each one's channel, its cgroup
        self.ordered: deque[tuple[socket.socket, Cgroup]] = deque()
        # without root, unshare(CLONE_NEWPID) needs a user namespace first: the keeper's way
        self.problem = "not root" if rootless else None
        self._signal_proxy: SignalProxy | None = None  # the zygote's (see _prepare_zygote)
        self.zygote = self._start_zygote()

    def wanted(self) -> bool:
        return len(self.spares) + len(self.ordered) < self.SPARES and self.problem is None

    def prepare(self) -> None:
        """Make one more spare: order it (it comes in `arrived`). If this fails (resources,
        privileges) no more are made; every container then starts from a fresh one, which
        reports the problem as its own."""
        try:
            self._order()
        except (OSError, MinictrError) as problem:
            self.problem = str(problem)

    def arrived(self) -> None:
        """Receive the zygote's answer to our oldest order (waiting for it if need be: it is
        read when a container needs the spare, by then long there)."""
        channel, cgroup = self.ordered.popleft()
        try:
            pid = self.zygote.receive()
        except BaseException as error:  # noqa: BLE001 - _drop_order raises it again
            self._drop_order(channel, cgroup, error)
            return
        self.spares.append(Spare(pid, channel, cgroup))

    def take(self) -> Spare:
        """A spare for a container starting now: the oldest, or one ordered now. A zygote
        found gone on the way is asked no more: the one that replaced it is (this ends: one
        that never answered is not replaced, and the launcher itself is never gone)."""
        while not self.spares:
            if not self.ordered:
                self._order()
            if self.ordered:  # (unless the zygote was found gone)
                self.arrived()
        return self.spares.popleft()

    def take_prepared(self) -> Spare:
        """A spare that has built its namespaces and stage, for a sandboxed test body to
        join: before, /proc/PID/ns of it could still name ours."""
        spare = self.take()
        try:
            _wait_until_prepared(spare)
        except BaseException:
            self.discard(spare)
            raise
        return spare

    def discard(self, spare: Spare) -> None:
        """A spare not used, or one whose processes are dead: reap it, remove its group."""
        spare.channel.close()  # its end of file tells the spare to exit
        os.waitpid(spare.pid, 0)
        spare.cgroup.discard()

    def run_plan(self, steps: tuple[plan.Step, ...], fds: ChildFds,
                 keep: tuple[int, ...]) -> int:
        """Run a whole plan (a keeper's, an exec helper's) in a new child of ours, by the
        zygote (or the one that replaced it). `keep`: fds the plan names besides `fds`."""
        while True:
            while self.ordered:  # a zygote's answers come in order: the spares' first
                self.arrived()
            try:
                return self.zygote.run(steps, fds, keep)
            except ZygoteGone as gone:
                self._lose_zygote(gone)

    def shut_down(self) -> None:
        """Let the spares go (end of its channel tells one to exit), remove their cgroups."""
        while self.ordered:
            self.arrived()  # to know its pid, and wait for it in discard
        while self.spares:
            self.discard(self.spares.popleft())
        self.zygote.close()

    def _order(self) -> None:
        cgroup = self.new_cgroup(Limits())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.zygote.order(theirs.fileno(), cgroup)
        except BaseException as error:  # noqa: BLE001 - _drop_order raises it again
            self._drop_order(ours, cgroup, error)
            return
        finally:
            theirs.close()
        self.ordered.append((ours, cgroup))

    def _drop_order(self, channel: socket.socket, cgroup: Cgroup,
                    error: BaseException) -> None:
        """An order that failed: its channel and cgroup go. A gone zygote is let go (the
        caller goes on without it); any other failure is raised again."""
        channel.close()
        cgroup.discard()
        if not isinstance(error, ZygoteGone):
            raise error
        self._lose_zygote(error)

    def _lose_zygote(self, error: ZygoteGone) -> None:
        """The zygote is gone: what it did not answer will not come. The next is another of
        its kind if it is `replaceable`, else the launcher forks its children itself."""
        gone = self.zygote
        print(f"minictr launcher: the zygote is gone ({error}); "
              f"{'starting another' if gone.replaceable else 'forking spares here'}",
              file=sys.stderr)
        gone.close()
        while self.ordered:
            channel, cgroup = self.ordered.popleft()
            channel.close()
            cgroup.discard()
        self.zygote = self._start_zygote() if gone.replaceable else self._no_zygote()

    def _start_zygote(self) -> Zygote | NoZygote:
        """The native zygote where there is a native core (it runs keepers and exec helpers
        too: without root as well); else, as root, the Python one; else none."""
        try:
            if self.native_program is not None:
                return NativeZygote(self.native_program, self.own_pidfd, self.userns_fds,
                                    self._prepared_plan)
            if not self.rootless:
                return Zygote(self.own_pidfd, self.own_pid_namespace, self.userns_fds,
                              self._prepare_zygote, self._spare_main)
        except OSError as problem:
            print(f"minictr launcher: no zygote ({problem}); forking spares here",
                  file=sys.stderr)
        return self._no_zygote()

    def _no_zygote(self) -> NoZygote:
        return NoZygote(self.own_pidfd, self.own_pid_namespace, self._prepare_zygote,
                        self._spare_main)

    def _prepared_plan(self, cgroup: Cgroup) -> bytes:
        """What a spare in `cgroup` carries out before its spec comes, encoded."""
        return plan.encode(plan.prepared_ahead(where_in(self.where, cgroup)))

    def _prepare_zygote(self) -> None:
        """Run in the zygote, once: what every spare inherits rather than makes. Signal
        handlers and mask survive fork: some 60 of them, a third of a millisecond a spare."""
        self._signal_proxy = SignalProxy()

    def _spare_main(self, channel: int, cgroup_name: str) -> NoReturn:
        """What a spare forked by the zygote runs (in the zygote's copy of us)."""
        assert self._signal_proxy is not None  # (_prepare_zygote ran first, in the zygote)
        cgroup = self.cgroups.open(cgroup_name)
        run_spare(channel, self.own_pidfd, plan.prepared_ahead(where_in(self.where, cgroup)),
                  self.userns_fds, self._signal_proxy)


def where_in(where: Where, cgroup: Cgroup) -> Where:
    """What a plan that joins `cgroup` needs to know of us besides the spec."""
    return replace(where, cgroup_procs=tuple(os.path.join(path, "cgroup.procs")
                                             for path in cgroup.paths))


def _wait_until_prepared(spare: Spare) -> None:
    """Until the spare has built its namespaces and stage. Done, it waits for its order in
    recvmsg (see `child.run_spare`), which is all it ever does there; the spare itself is
    left alone (a word from it on the channel, tried first, disturbed the containers'
    starts)."""
    deadline = time.monotonic() + SPARE_READY_TIMEOUT
    while True:
        try:
            if linux.waits_in(spare.pid, "recvmsg"):
                return
        except OSError as error:
            raise LauncherError(f"a spare init is gone ({error}); see `minictr doctor`") \
                from None
        if time.monotonic() > deadline:
            raise LauncherError(f"a spare init took over {SPARE_READY_TIMEOUT:g} s to build "
                                "its namespaces; see `minictr doctor`")
        time.sleep(0.0005)
