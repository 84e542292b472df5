"""Starting containers, in the launcher process: spares made ahead of need, the keeper
without root, the exec helper; the cgroup and limits of each.

A container is an init process, PID 1 of a new PID namespace, and the command it spawns:

    launcher ── init ── command                      (the caller is root: the usual case)
    launcher ── keeper ── init ── command            (the caller is not root)

As root, inits are forked ahead of need as spares by the launcher's zygote (see `zygote`),
straight into a new PID namespace, as children of the launcher: one fork of Python per
container, and not of the launcher itself. The init builds the container as host root and
enters the launcher's user namespace last (see `host.idmap`).
Without root, a user namespace must exist before the PID namespace it owns (mounting /proc
needs privilege over the PID namespace), and the launcher cannot leave a user namespace it
enters, so that case needs the keeper: a child that unshares everything, writes the id maps
and forks the init. What those children run is in `container`.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import NoReturn

from pytest_minictr import native, protocol
from pytest_minictr.container import plan, seccomp
from pytest_minictr.container.child import run_plan, run_spare
from pytest_minictr.container.init import ChildFds, SignalProxy
from pytest_minictr.container.plan import JOINED_NAMESPACES, Where
from pytest_minictr.errors import (
    ContainerNotFoundError,
    LauncherError,
    MinictrError,
    UnsupportedError,
)
from pytest_minictr.host import cgroups, idmap, linux
from pytest_minictr.host.cgroups import Cgroup, NullCgroup
from pytest_minictr.host.idmap import UserNamespace
from pytest_minictr.launcher.native import NativeZygote
from pytest_minictr.launcher.zygote import Zygote, ZygoteGone
from pytest_minictr.spec import ContainerSpec, Limits

PLANS_KEPT = 32  # specs whose plan is kept encoded (see Starter._encoded_plan)
SPARE_READY_TIMEOUT = 60.0  # seconds a spare may take to build its namespaces and stage


@dataclass(frozen=True)
class Spare:
    """An init forked ahead of need: in its own cgroup and its own PID, mount, UTS, IPC and
    network namespaces, waiting on `channel` for a spec and the container's descriptors."""

    pid: int
    channel: socket.socket
    cgroup: Cgroup


@dataclass(frozen=True)
class ExecTarget:
    """A running container another command joins: our child of it (its init; or its keeper,
    which holds the same namespaces and, unlike the init, lets our uid read them) and its
    cgroup."""

    child_pid: int
    cgroup: Cgroup


@dataclass(frozen=True)
class Started:
    """A container just started: the pid to watch (our child), its cgroup, and whether that
    child is a keeper (which reports the init's pid) or the init itself."""

    pid: int
    cgroup: Cgroup
    keeper: bool = False


class Starter:
    """Lives in the launcher process: starts containers and returns the pid to watch.

    What a container needs before its spec is known is done ahead, by spare inits that the
    launcher makes while it has nothing else to do: the fork, the namespaces, the signal
    handlers, the mounts that do not depend on the spec (see `mounts`), and joining a cgroup.
    That last one matters most: moving a task between cgroups waits for an RCU grace period
    (about 2 ms per hierarchy here, five hierarchies on cgroup v1), which a spare pays in its
    own time. A container then only costs what its spec decides.
    """

    SPARES = 2  # enough to cover a burst of starts while the next spare joins its cgroup

    def __init__(self) -> None:
        # Both are inherited by every child: how an init checks that we are alive, and the
        # way back to our own PID namespace after forking into a new one.
        self.own_pidfd = os.pidfd_open(os.getpid())
        self.own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.spares: deque[Spare] = deque()
        # spares asked of the zygote, not yet answered: our end of each one's channel, its cgroup
        self.ordered: deque[tuple[socket.socket, Cgroup]] = deque()
        self.rootless = os.geteuid() != 0
        self.spares_problem = "not root" if self.rootless else None
        self.cgroups = cgroups.detect_or_null()
        cgroups.reap_stale(self.cgroups)  # what dead launchers left
        self.userns, self.userns_problem = (None, None) if self.rootless else _user_namespace()
        self.subordinate_ids = _subordinate_ids() if self.rootless else None
        # what a container's plan needs to know of us, but its cgroup (see _where)
        self.where = Where(rootless=self.rootless) if self.userns is None else Where(
            userns_fd=self.userns.fd, host_ids=(self.userns.host_uid, self.userns.host_gid))
        if os.uname().machine in seccomp.ARCHITECTURES:
            seccomp.host_filter()  # the default program, inherited by every init we fork
        self._serial = itertools.count(1)
        self._plans: dict[ContainerSpec, bytes] = {}  # see _encoded_plan, oldest first
        self._signal_proxy: SignalProxy | None = None  # the zygote's (see _prepare_zygote)
        # last: the zygote is a copy of us as we are now, and each spare a copy of it (the
        # native one runs keepers and exec helpers too: without root as well)
        self.native_program = native.native_program()
        self.zygote = self._start_zygote() \
            if self.spares_problem is None or self.native_program is not None else None

    def start(self, spec: ContainerSpec, fds: ChildFds,
              joins: tuple[int, ...] | None = None) -> Started:
        """Start a container: hand its plan to a spare (root), or fork a keeper that carries
        out the whole plan (not root). `joins`: the namespace fds of the pod it joins (see
        `launcher.pods`): the network namespace, and without root the user namespace before it."""
        self._check_limits(spec.limits)
        if spec.user_namespace and self.userns_problem is not None:
            raise UnsupportedError(f"no user namespace for the container: {self.userns_problem}"
                                   " (user=False runs it as host root)")
        limits = _with_room_for_the_init(spec.limits)
        if self.rootless:
            return self._start_keeper(spec, fds, self._new_cgroup(limits), joins)
        spare = self._take_spare()
        try:
            if limits.any():
                _apply_limits(spare.cgroup, limits)
        except BaseException:
            self._discard(spare)
            raise
        # a pod's later container: its spare joins the pod's network namespace, sent with
        # the container's fds (the spare was forked before anyone knew of the pod)
        steps = self._encoded_plan(spec) if joins is None else plan.encode(
            plan.completed_with(spec, replace(self.where, pod_netns=plan.Ref("pod netns"))))
        try:
            protocol.send_payload(spare.channel, steps, fds.all() + tuple(joins or ()))
        except OSError:
            pass  # the spare died (someone killed it): that shows up as the container's end
        finally:
            spare.channel.close()
        return Started(spare.pid, spare.cgroup)

    def start_exec(self, target: ExecTarget, spec: ContainerSpec, fds: ChildFds) -> Started:
        """Fork a helper that runs `spec.argv` inside the running container `target`; like a
        keeper, it reports its command's pid on the setup pipe."""
        userns = self.userns if spec.user_namespace and not self.rootless else None
        # as root, the container's user namespace is entered last, as its init did (confine)
        namespaces = open_namespaces(target.child_pid, skip=() if userns is None else ("user",))
        try:
            steps = plan.exec_plan(spec, self._where(target.cgroup), tuple(namespaces))
            pid = self._run_plan(steps, fds, tuple(fd for fd in namespaces if fd is not None)
                                 + (() if userns is None else (userns.fd,)))
        finally:
            for fd in namespaces:
                if fd is not None:
                    os.close(fd)
        return Started(pid, NullCgroup(), keeper=True)  # the container's group is its own

    def sandbox_cgroup(self, limits: Limits) -> Cgroup:
        """Without root, the group of a sandboxed test body (see `sandboxes`): its pids limit
        counts the body's processes, not its keeper and init."""
        self._check_limits(limits)
        return self._new_cgroup(limits if limits.pids is None
                                else replace(limits, pids=limits.pids + 2))

    def spare_for_body(self, limits: Limits) -> Spare:
        """As root, a spare whose cgroup, namespaces and stage a sandboxed test body joins
        (the body forks from the caller, and is spared making them), `limits` on its group."""
        self._check_limits(limits)
        spare = self._take_spare()
        try:
            _wait_until_prepared(spare)
            if limits.any():
                _apply_limits(spare.cgroup, _with_room_for_the_init(limits))
        except BaseException:
            self._discard(spare)
            raise
        return spare

    def release_spare(self, spare: Spare) -> None:
        """A spare a body used: its processes are dead (see `sandboxes`); reap it, remove its
        group."""
        self._discard(spare)

    def wants_spare(self) -> bool:
        # without root, unshare(CLONE_NEWPID) needs a user namespace first: the keeper's way
        return (len(self.spares) + len(self.ordered) < self.SPARES
                and self.spares_problem is None)

    def prepare_spare(self) -> None:
        """Make one more spare: order it from the zygote (it comes in `spare_arrived`), or
        fork it here. If this fails (resources, privileges) no more are made; every container
        then starts from a fresh one, which reports the problem as its own."""
        try:
            if self.zygote is not None:
                self._order_spare()
            else:
                self.spares.append(self._fork_spare())
        except (OSError, MinictrError) as problem:
            self.spares_problem = str(problem)

    def spare_arrived(self) -> None:
        """Receive the zygote's answer to our oldest order (waiting for it if need be: it is
        read when a container needs the spare, by then long there)."""
        channel, cgroup = self.ordered.popleft()
        try:
            pid = self.zygote.receive()
        except BaseException as error:  # noqa: BLE001 - _drop_order raises it again
            self._drop_order(channel, cgroup, error)
            return
        self.spares.append(Spare(pid, channel, cgroup))

    def shut_down(self) -> None:
        """Let the spares go (end of its channel tells one to exit), remove their cgroups."""
        while self.ordered and self.zygote is not None:
            self.spare_arrived()  # to know its pid, and wait for it in _discard
        while self.spares:
            self._discard(self.spares.popleft())
        if self.zygote is not None:
            self.zygote.close()
        self.cgroups.release()
        if self.userns is not None:
            os.close(self.userns.fd)

    def _discard(self, spare: Spare) -> None:
        spare.channel.close()  # its end of file tells the spare to exit
        os.waitpid(spare.pid, 0)
        spare.cgroup.discard()

    def _start_keeper(self, spec: ContainerSpec, fds: ChildFds, cgroup: Cgroup,
                      joins: tuple[int, ...] | None = None) -> Started:
        """Fork the keeper. With subordinate ids, it stops after making its user namespace
        until we have mapped it in full from out here (only a process outside may). In a
        pod, it joins the pod's user namespace (mapped already) and network namespace."""
        ready_r, ready_w, go_r, go_w = (*os.pipe(), *os.pipe()) \
            if self.subordinate_ids and joins is None else (None,) * 4
        ours = {ready_r, go_w} - {None}
        handshake = None if ready_w is None else (ready_w, go_r)
        where = replace(self._where(cgroup), id_maps=handshake)
        if joins is not None:
            where = replace(where, pod_userns=joins[0], pod_netns=joins[1])
        try:
            try:
                steps = plan.setup_plan(spec, where)
                pid = self._run_plan(steps, fds, (handshake or ()) + (joins or ()))
            finally:
                for fd in {ready_w, go_r} - {None}:
                    os.close(fd)  # the keeper's ends: its exit must show as end of file
            if ours:
                self._map_keeper(pid, ready_r, go_w)
        except BaseException:
            cgroup.discard()
            raise
        finally:
            for fd in ours:
                os.close(fd)
        return Started(pid, cgroup, keeper=True)

    def _run_plan(self, steps: tuple[plan.Step, ...], fds: ChildFds,
                  keep: tuple[int, ...]) -> int:
        """Run a whole plan (a keeper's, an exec helper's) in a new child of ours: by the
        native zygote, else in a fork of ours. `keep`: fds the plan names besides `fds`."""
        while isinstance(self.zygote, NativeZygote):  # (or the one that replaced it)
            while self.ordered:  # its answers come in order: the spares' first
                self.spare_arrived()
            if isinstance(self.zygote, NativeZygote):
                try:
                    return self.zygote.run(plan.encode(steps), fds.all(), keep)
                except ZygoteGone as gone:
                    self._lose_zygote(gone)
        pid = os.fork()
        if pid == 0:
            run_plan(steps, fds, self.own_pidfd, keep)
        return pid

    def _map_keeper(self, pid: int, ready: int, go: int) -> None:
        if os.read(ready, 1) == b"1":  # else the keeper failed: it reports that itself
            try:
                idmap.map_with_helpers(pid, os.geteuid(), os.getegid(), self.subordinate_ids)
            except OSError as error:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise UnsupportedError(
                    f"cannot map the container's ids with the subordinate ranges of "
                    f"/etc/subuid and /etc/subgid: {error}") from None
            os.write(go, b"1")

    def _encoded_plan(self, spec: ContainerSpec) -> bytes:
        """What a spare carries out of `spec`'s plan, encoded. All of it but its last step
        depends on the container's filesystem and confinement only, which a test suite or a
        grader repeats from one start to the next with other commands: that part is kept,
        encoded, for the last few specs (a start then spends 15 us on its plan, not 60)."""
        key = replace(spec, argv=(), env=())
        head = self._plans.pop(key, None)
        if head is None:
            head = plan.encode(plan.completed_with(spec, self.where)[:-1])
        self._plans[key] = head
        if len(self._plans) > PLANS_KEPT:
            del self._plans[next(iter(self._plans))]
        return plan.encode_with(head, plan.run_command(spec))

    def _where(self, cgroup: Cgroup) -> Where:
        """What a plan that joins `cgroup` needs to know of us besides the spec."""
        return replace(self.where, cgroup_procs=tuple(os.path.join(path, "cgroup.procs")
                                                      for path in cgroup.paths))

    def _check_limits(self, limits: Limits) -> None:
        if limits.any():
            self.cgroups.check_limits(limits)

    def _new_cgroup(self, limits: Limits) -> Cgroup:
        return self.cgroups.create(cgroups.group_name(str(next(self._serial))), limits)

    def _take_spare(self) -> Spare:
        """A spare for a container starting now: the oldest, from the zygote if it has
        one for us (or makes one now), else forked here. A zygote found gone on the way is
        asked no more: the one that replaced it is (this ends: one that never answered is not
        replaced, see _lose_zygote)."""
        while not self.spares and self.zygote is not None:
            if not self.ordered:
                self._order_spare()
            if self.ordered:  # (unless the zygote was found gone)
                self.spare_arrived()
        return self.spares.popleft() if self.spares else self._fork_spare()

    def _order_spare(self) -> None:
        cgroup = self._new_cgroup(Limits())
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
        """A native zygote is replaced (its spares are our only way to keep Python out of
        containers, and starting one costs one posix_spawn); a Python one is not, nor a
        native one that died before its first answer (it would die again: one dead zygote
        and one restart per container)."""
        if self.zygote is not None:  # we are the first to find it gone
            if self.native_program is not None and not self.zygote.answered:
                self.native_program = None
            print(f"minictr launcher: the zygote is gone ({error}); "
                  f"{'starting another' if self.native_program else 'forking spares here'}",
                  file=sys.stderr)
            self.zygote.close()
            self.zygote = None
            while self.ordered:  # what it did not answer will not come
                self._drop_order(*self.ordered.popleft(), error)
            if self.native_program is not None:
                self.zygote = self._start_zygote()

    def _fork_spare(self) -> Spare:
        cgroup = self._new_cgroup(Limits())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            steps = plan.prepared_ahead(self._where(cgroup))
            pid = linux.fork_into_new_pid_namespace(self.own_pid_namespace)
            if pid == 0:
                run_spare(theirs.fileno(), self.own_pidfd, steps, self._userns_fds(),
                          SignalProxy())
        except BaseException:
            ours.close()
            cgroup.discard()
            raise
        finally:
            theirs.close()
        return Spare(pid, ours, cgroup)

    def _start_zygote(self) -> Zygote | None:
        try:
            if self.native_program is not None:
                return NativeZygote(self.native_program, self.own_pidfd, self._userns_fds(),
                                    self._prepared_plan)
            return Zygote(self.own_pidfd, self.own_pid_namespace, self._userns_fds(),
                          self._prepare_zygote, self._spare_main)
        except OSError as problem:
            print(f"minictr launcher: no zygote ({problem}); forking spares here",
                  file=sys.stderr)
            return None

    def _prepared_plan(self, cgroup: Cgroup) -> bytes:
        """What a spare in `cgroup` carries out before its spec comes, encoded."""
        return plan.encode(plan.prepared_ahead(self._where(cgroup)))

    def _prepare_zygote(self) -> None:
        """Run in the zygote, once: what every spare inherits rather than makes. Signal
        handlers and mask survive fork: some 60 of them, a third of a millisecond a spare."""
        self._signal_proxy = SignalProxy()

    def _spare_main(self, channel: int, cgroup_name: str) -> NoReturn:
        """What a spare forked by the zygote runs (in the zygote's copy of us)."""
        cgroup = self.cgroups.open(cgroup_name)
        run_spare(channel, self.own_pidfd, plan.prepared_ahead(self._where(cgroup)),
                  self._userns_fds(), self._signal_proxy)

    def _userns_fds(self) -> tuple[int, ...]:
        return () if self.userns is None else (self.userns.fd,)


def _wait_until_prepared(spare: Spare) -> None:
    """Until the spare has built its namespaces and stage: before, /proc/PID/ns of it could
    still name ours. Done, it waits for its order in recvmsg (see `child.run_spare`), which
    is all it ever does there; the spare itself is left alone (a word from it on the
    channel, tried first, disturbed the containers' starts)."""
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


def _with_room_for_the_init(limits: Limits) -> Limits:
    """pids_limit counts the command's processes; our init is one more in the group."""
    return limits if limits.pids is None else replace(limits, pids=limits.pids + 1)


def _apply_limits(cgroup: Cgroup, limits: Limits) -> None:
    try:
        cgroup.apply_limits(limits)
    except MinictrError as refused:
        raise UnsupportedError(f"the kernel refused the limits {limits}: {refused}") from None


def _subordinate_ids() -> tuple[int, int] | None:
    """Our subordinate id ranges, where the setuid helpers that map them are installed."""
    if not (shutil.which("newuidmap") and shutil.which("newgidmap")):
        return None
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return idmap.subordinate_ids(user, idmap.read_text("/etc/subuid"),
                                 idmap.read_text("/etc/subgid"), os.geteuid())


def _user_namespace() -> tuple[UserNamespace | None, str | None]:
    """The user namespace of this launcher's containers; or why there is none (user
    namespaces disabled by a sysctl, or a seccomp filter of our own container)."""
    try:
        return idmap.make_user_namespace(), None
    except OSError as problem:
        return None, f"cannot make a user namespace: {problem.strerror or problem}"


def open_namespaces(pid: int, skip: tuple[str, ...]) -> list[int | None]:
    """fds of `pid`'s namespaces, in JOINED_NAMESPACES order, opened here, by the launcher
    (once the helper is in the container's mount namespace, /proc is the container's; and a
    container that has just ended is told apart here). None for those in `skip` and those we
    share already."""
    fds: list[int | None] = []
    try:
        for name, _ in JOINED_NAMESPACES:
            path = f"/proc/{pid}/ns/{name}"
            if name in skip or os.stat(path).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
                fds.append(None)
            else:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        raise ContainerNotFoundError("the container is not running (it has just ended)") \
            from None
    return fds

