"""The process choreography of one container, run by the launcher and its forked children.

A container is an init process, PID 1 of a new PID namespace, and the command it spawns:

    launcher ── init ── command                      (the caller is root: the usual case)
    launcher ── keeper ── init ── command            (the caller is not root)

The init builds the mounts, pivot_roots and spawns the command, then does what the kernel asks
of a PID 1: orphans are reparented to it (someone has to reap them), and signals reach it only
if it installed a handler (so it forwards SIGTERM and friends to the command, which could not
be stopped gently otherwise). When the command exits, the init exits, and the kernel kills
every process left in the namespace, even those that detached with setsid(); the init's exit
is reported to its parent only after they are all gone.

As root, inits are forked ahead of need as spares by the launcher's zygote (see `zygote`),
straight into a new PID namespace, as children of the launcher: one fork of Python per
container, and not of the launcher itself. The init builds the container as host root and
enters the launcher's user namespace last (see `idmap`).
Without root, a user namespace must exist before the PID namespace it owns (mounting /proc
needs privilege over the PID namespace), and the launcher cannot leave a user namespace it
enters, so that case needs the keeper: a child that unshares everything, writes the id maps
and forks the init.

The command is started with posix_spawn (vfork-style, no copy of our memory, no Python running
in the child); it gets a new session (no controlling terminal to push input into:
CVE-2017-5226), stdio, default signal dispositions and an empty signal mask.

Each process dies with its parent (PR_SET_PDEATHSIG), so a killed launcher takes its containers
along. A failure before the command runs travels to the launcher as one JSON line on a
close-on-exec "setup" pipe; its end of file, once every copy is closed, means the command runs.
The init (and the keeper) write the command's (and the init's) wait status to a "status" pipe.
Every function run in a forked child ends in os._exit(): it must never return into the launcher.
"""

from __future__ import annotations

import _signal
import errno
import fcntl
import gc
import itertools
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import NoReturn

from . import cgroups, idmap, linux, mounts, protocol, seccomp, security
from .cgroups import Cgroup, CgroupBackend
from .errors import (CommandNotFoundError, ContainerNotFoundError, ContainerSetupError,
                     MinictrError, UnsupportedError)
from .idmap import UserNamespace
from .linux import attempt
from .spec import ContainerSpec, Limits
from .zygote import Zygote, ZygoteGone

# Signals the init passes on to the command: every one a sender may mean for the command. Not
# those that cannot be caught, SIGCHLD (the init's own business), nor the faults the kernel
# sends a process about itself.
FORWARDED_SIGNALS = tuple(sorted(set(signal.valid_signals()) - {
    signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
    signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS}))
# Signals reset to their default in the command. exec resets handled ones, not ignored ones
# (Python ignores SIGPIPE and SIGXFSZ, the launcher SIGINT): all of them, rather than asking
# which are ignored (65 lookups: a tenth of a millisecond in a freshly forked init).
RESET_SIGNALS = tuple(sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}))
# The namespaces a spare unshares ahead of need (PID comes from its parent; the mount
# namespace with the mounts, see `mounts`). CGROUP: the cgroup is joined first, so
# /proc/self/cgroup inside shows "/" and nothing of the host's layout.
SPARE_NAMESPACES = (linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWNET
                    | linux.CLONE_NEWCGROUP)
LAYER_LOCK_WAIT = 2.0  # seconds a container waits for the previous user of its layer to exit


@dataclass(frozen=True)
class ChildFds:
    """The descriptors a container's processes keep from the launcher; all others are closed."""

    stdin: int
    stdout: int
    stderr: int
    setup: int     # write end of the setup pipe (close-on-exec)
    status: int    # write end of the status pipe (close-on-exec)

    def stdio(self) -> tuple[int, int, int]:
        return self.stdin, self.stdout, self.stderr

    def all(self) -> tuple[int, ...]:
        return self.stdin, self.stdout, self.stderr, self.setup, self.status


@dataclass(frozen=True)
class Spare:
    """An init forked ahead of need: in its own cgroup and its own PID, mount, UTS, IPC and
    network namespaces, waiting on `channel` for a spec and the container's descriptors."""

    pid: int
    channel: socket.socket
    cgroup: Cgroup | None


@dataclass(frozen=True)
class ExecTarget:
    """A running container another command joins: our child of it (its init; or its keeper,
    which holds the same namespaces and, unlike the init, lets our uid read them) and its
    cgroup."""

    child_pid: int
    cgroup: Cgroup | None


@dataclass(frozen=True)
class Started:
    """A container just started: the pid to watch (our child), its cgroup, and whether that
    child is a keeper (which reports the init's pid) or the init itself."""

    pid: int
    cgroup: Cgroup | None
    keeper: bool = False


class Launcher:
    """Lives in the launcher process: starts containers and returns the pid to watch.

    What a container needs before its spec is known is done ahead, by spare inits that the
    forkserver makes while it has nothing else to do: the fork, the namespaces, the signal
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
        self.ordered: deque[tuple[socket.socket, Cgroup | None]] = deque()
        self.rootless = os.geteuid() != 0
        self.spares_problem = "not root" if self.rootless else None
        self.cgroups, self.cgroups_problem = _detect_cgroups()
        self.userns, self.userns_problem = (None, None) if self.rootless else _user_namespace()
        self.subordinate_ids = _subordinate_ids() if self.rootless else None
        if os.uname().machine in seccomp.ARCHITECTURES:
            seccomp.host_filter()  # the default program, inherited by every init we fork
        self._serial = itertools.count(1)
        self._forwarder: SignalForwarder | None = None  # the zygote's (see _prepare_zygote)
        # last: the zygote is a copy of us as we are now, and each spare a copy of it
        self.zygote = self._start_zygote() if self.spares_problem is None else None

    def start(self, spec: ContainerSpec, fds: ChildFds, spec_data: dict) -> Started:
        """`spec_data` is `spec` as received, passed on as it is to a spare."""
        self._check_limits(spec.limits)
        if spec.user_namespace and self.userns_problem is not None:
            raise UnsupportedError(f"no user namespace for the container: {self.userns_problem}"
                                   " (user=False runs it as host root)")
        limits = _with_room_for_the_init(spec.limits)
        if self.rootless:
            return self._start_keeper(spec, fds, self._new_cgroup(limits))
        spare = self._take_spare()
        try:
            if spare.cgroup is not None and limits.any():
                _apply_limits(spare.cgroup, limits)
        except BaseException:
            self._discard(spare)
            raise
        try:
            protocol.send_message(spare.channel, spec_data, fds.all())
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
            pid = os.fork()
            if pid == 0:
                run_exec(spec, target, fds, self.own_pidfd, userns, namespaces)
        finally:
            for fd in namespaces:
                if fd is not None:
                    os.close(fd)
        return Started(pid, None, keeper=True)

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
        except BaseException as error:
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
        if self.cgroups is not None:
            self.cgroups.release()
        if self.userns is not None:
            os.close(self.userns.fd)

    def _discard(self, spare: Spare) -> None:
        spare.channel.close()  # its end of file tells the spare to exit
        os.waitpid(spare.pid, 0)
        remove_cgroup(spare.cgroup)

    def _start_keeper(self, spec: ContainerSpec, fds: ChildFds,
                      cgroup: Cgroup | None) -> Started:
        """Fork the keeper. With subordinate ids, it stops after making its user namespace
        until we have mapped it in full from out here (only a process outside may)."""
        ready_r, ready_w, go_r, go_w = (*os.pipe(), *os.pipe()) if self.subordinate_ids \
            else (None,) * 4
        ours = {ready_r, go_w} - {None}
        try:
            try:
                pid = os.fork()
                if pid == 0:
                    run_keeper(spec, fds, self.own_pidfd, cgroup,
                               None if ready_w is None else (ready_w, go_r))
            finally:
                for fd in {ready_w, go_r} - {None}:
                    os.close(fd)  # the keeper's ends: its exit must show as end of file
            if ours:
                self._map_keeper(pid, ready_r, go_w)
        except BaseException:
            remove_cgroup(cgroup)
            raise
        finally:
            for fd in ours:
                os.close(fd)
        return Started(pid, cgroup, keeper=True)

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

    def _check_limits(self, limits: Limits) -> None:
        if limits.any():
            if self.cgroups is None:
                raise UnsupportedError(f"resource limits need cgroups: {self.cgroups_problem}")
            self.cgroups.check_limits(limits)

    def _new_cgroup(self, limits: Limits) -> Cgroup | None:
        if self.cgroups is None:
            return None
        return self.cgroups.create(cgroups.group_name(str(next(self._serial))), limits)

    def _take_spare(self) -> Spare:
        """A spare for a container starting now: the oldest, from the zygote if it has
        one for us (or makes one now), else forked here."""
        if not self.spares and self.zygote is not None:
            if not self.ordered:
                self._order_spare()
            if self.ordered:  # (unless the zygote was found gone)
                self.spare_arrived()
        return self.spares.popleft() if self.spares else self._fork_spare()

    def _order_spare(self) -> None:
        cgroup = self._new_cgroup(Limits())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.zygote.order(theirs.fileno(), None if cgroup is None else cgroup.name)
        except BaseException as error:
            self._drop_order(ours, cgroup, error)
            return
        finally:
            theirs.close()
        self.ordered.append((ours, cgroup))

    def _drop_order(self, channel: socket.socket, cgroup: Cgroup | None,
                    error: BaseException) -> None:
        """An order that failed: its channel and cgroup go. A gone zygote is let go (the
        caller goes on without it); any other failure is raised again."""
        channel.close()
        remove_cgroup(cgroup)
        if not isinstance(error, ZygoteGone):
            raise error
        if self.zygote is not None:  # we are the first to find it gone
            print(f"minictr launcher: the zygote is gone ({error}); forking spares here",
                  file=sys.stderr)
            self.zygote.close()
            self.zygote = None
            while self.ordered:  # what it did not answer will not come
                self._drop_order(*self.ordered.popleft(), error)

    def _fork_spare(self) -> Spare:
        cgroup = self._new_cgroup(Limits())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = linux.fork_into_new_pid_namespace(self.own_pid_namespace)
            if pid == 0:
                run_spare(theirs.fileno(), self.own_pidfd, cgroup, self.userns)
        except BaseException:
            ours.close()
            remove_cgroup(cgroup)
            raise
        finally:
            theirs.close()
        return Spare(pid, ours, cgroup)

    def _start_zygote(self) -> Zygote | None:
        try:
            return Zygote(self.own_pidfd, self.own_pid_namespace,
                          () if self.userns is None else (self.userns.fd,),
                          self._prepare_zygote, self._spare_main)
        except OSError as problem:
            print(f"minictr launcher: no zygote ({problem}); forking spares here",
                  file=sys.stderr)
            return None

    def _prepare_zygote(self) -> None:
        """Run in the zygote, once: what every spare inherits rather than makes. Signal
        handlers and mask survive fork: some 60 of them, a third of a millisecond a spare."""
        self._forwarder = SignalForwarder()

    def _spare_main(self, channel: int, cgroup_name: str | None) -> NoReturn:
        """What a spare forked by the zygote runs (in the zygote's copy of us)."""
        cgroup = None if cgroup_name is None else self.cgroups.open(cgroup_name)
        run_spare(channel, self.own_pidfd, cgroup, self.userns, self._forwarder)


def remove_cgroup(cgroup: Cgroup | None) -> None:
    """Remove a container's group; one that will not go (a process still in it) is killed
    first. One that still will not go must not take the launcher down, nor hide the error that
    brought us here: it is reported, and the next launcher's reap_stale() retries."""
    if cgroup is None:
        return
    try:
        cgroup.remove()
    except MinictrError:
        try:
            cgroup.kill()
            cgroup.remove()
        except MinictrError as error:
            print(f"minictr launcher: {error}", file=sys.stderr)


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


def _detect_cgroups() -> tuple[CgroupBackend | None, str | None]:
    """The host's cgroup backend, after removing what dead launchers left; or why there is
    none (containers then run without limits or measurements)."""
    try:
        backend = cgroups.detect()
    except MinictrError as problem:
        return None, str(problem)
    cgroups.reap_stale(backend)
    return backend, None


# ---------------------------------------------------------------------------------------------
# The keeper (user namespaces only): outside the PID namespace, it owns the namespaces.

def run_keeper(spec: ContainerSpec, fds: ChildFds, parent_pidfd: int, cgroup: Cgroup | None,
               handshake: tuple[int, int] | None) -> NoReturn:
    """`handshake`: (ready, go) pipe ends when the launcher maps our ids; else we map our
    own uid alone."""
    code = 1
    try:
        die_with_parent(parent_pidfd, fds.all() + (handshake or ()))
        if cgroup is not None:
            join_cgroup(cgroup, os.getpid())  # before unshare: no moment runs unlimited
        uid, gid = os.geteuid(), os.getegid()
        attempt("unshare the user namespace", linux.unshare, linux.CLONE_NEWUSER)
        if handshake is None:
            attempt("write uid/gid maps", idmap.map_self, uid, gid)
        else:
            wait_for_id_maps(*handshake)
        attempt("unshare namespaces", linux.unshare, linux.CLONE_NEWPID | linux.CLONE_NEWNS
                | SPARE_NAMESPACES)
        keeper_pidfd = os.pidfd_open(os.getpid())
        init_pid = os.fork()
        if init_pid == 0:
            run_init(spec, fds, keeper_pidfd)
        _write_line(fds.setup, {"pid": init_pid})
        for fd in fds.stdio() + (fds.setup, keeper_pidfd):
            os.close(fd)
        _, wait_status = os.waitpid(init_pid, 0)
        _write_line(fds.status, {"init": wait_status})
        code = 0
    except BaseException as error:  # noqa: BLE001 - everything must reach the caller
        report_failure(fds.setup, error)
    finally:
        os._exit(code)


def wait_for_id_maps(ready: int, go: int) -> None:
    os.write(ready, b"1")
    if os.read(go, 1) != b"1":
        raise ContainerSetupError("the launcher could not map the container's ids",
                                  "write uid/gid maps")
    os.close(ready)
    os.close(go)


# ---------------------------------------------------------------------------------------------
# The exec helper: another command in a running container.

# The user namespace first (without root, it owns the others: joining them needs its
# capabilities); the mount namespace last (it moves our root into the container).
JOINED_NAMESPACES = (("user", linux.CLONE_NEWUSER), ("ipc", linux.CLONE_NEWIPC),
                     ("uts", linux.CLONE_NEWUTS), ("net", linux.CLONE_NEWNET),
                     ("cgroup", linux.CLONE_NEWCGROUP), ("pid_for_children", linux.CLONE_NEWPID),
                     ("mnt", linux.CLONE_NEWNS))


def run_exec(spec: ContainerSpec, target: ExecTarget, fds: ChildFds, parent_pidfd: int,
             userns: UserNamespace | None, namespaces: list[int | None]) -> NoReturn:
    """Join the container's cgroup and namespaces, confine ourselves as its init did its
    command, spawn `spec.argv` (into the container's PID namespace: pid_for_children), report
    its pid, wait, report its status. We stay outside the PID namespace: if the container ends,
    the kernel kills the command, and we report that."""
    code = 1
    try:
        die_with_parent(parent_pidfd, fds.all() + (() if userns is None else (userns.fd,))
                        + tuple(fd for fd in namespaces if fd is not None))
        if target.cgroup is not None:
            join_cgroup(target.cgroup, 0)
        for (name, nstype), fd in zip(JOINED_NAMESPACES, namespaces, strict=True):
            if fd is not None:
                attempt(f"join the container's {name} namespace", linux.setns, fd, nstype)
                os.close(fd)
        attempt(f"chdir to cwd={spec.cwd!r}", os.chdir, spec.cwd)
        layer = os.statvfs("/")
        confine(spec, layer.f_blocks * layer.f_frsize, userns, parent_pidfd)
        command_pid = spawn_command(spec, fds)
        _write_line(fds.setup, {"pid": command_pid})
        for fd in fds.stdio() + (fds.setup,):
            os.close(fd)
        _, wait_status = os.waitpid(command_pid, 0)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        _write_line(fds.status, {"command": wait_status,
                                 "cpu_time": usage.ru_utime + usage.ru_stime})
        code = 0
    except BaseException as error:  # noqa: BLE001
        report_failure(fds.setup, error)
    finally:
        os._exit(code)


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


# ---------------------------------------------------------------------------------------------
# The init: PID 1 of the container.

def run_init(spec: ContainerSpec, fds: ChildFds, parent_pidfd: int) -> NoReturn:
    """The keeper's child, already in every namespace."""
    code = 1
    try:
        die_with_parent(parent_pidfd, fds.all())
        code = be_init(spec, fds, SignalForwarder(), parent_pidfd, None,
                       inside_user_namespace=True)
    except BaseException as error:  # noqa: BLE001
        report_failure(fds.setup, error)
    finally:
        os._exit(code)


def run_spare(channel: int, parent_pidfd: int, cgroup: Cgroup | None,
              userns: UserNamespace | None, forwarder: "SignalForwarder | None" = None
              ) -> NoReturn:
    """A spare init: joins its cgroup, unshares and prepares now, then waits for its
    container's spec and descriptors. A failure is kept until there is a setup pipe to
    report it on. `forwarder`: one inherited from the zygote, installed already."""
    code, fds = 1, None
    try:
        die_with_parent(parent_pidfd, (channel,) if userns is None else (channel, userns.fd))
        forwarder = forwarder or SignalForwarder()
        try:
            if cgroup is not None:
                join_cgroup(cgroup, 0)  # 0: the writer itself (our pid here is 1)
            attempt("unshare namespaces", linux.unshare, SPARE_NAMESPACES)
            attempt("open low ports and ping", open_low_ports_and_ping)
            watch = mounts.HostMountWatch()  # before our copy of the host's mounts
            mounts.prepare()
            early_failure = None
        except Exception as failure:  # noqa: BLE001 - whatever it is, the caller hears of it
            early_failure = failure
        with socket.socket(fileno=channel) as sock:
            order = protocol.recv_message(sock)
        if order is None:
            os._exit(0)  # discarded: the launcher is shutting down
        spec, fds = ContainerSpec.from_dict(order[0]), ChildFds(*order[1])
        if early_failure is not None:
            raise early_failure
        code = be_init(spec, fds, forwarder, parent_pidfd, userns, watch)
    except BaseException as error:  # noqa: BLE001
        if fds is not None:
            report_failure(fds.setup, error)
    finally:
        os._exit(code)


def own_network(network: str) -> None:
    """A network namespace owned by container root's user namespace (see `security`), in
    place of the one made as host root; low ports need no sysctl in it (root owns it)."""
    linux.unshare(linux.CLONE_NEWNET)
    if network == "loopback":
        linux.set_link_up("lo")


def open_low_ports_and_ping() -> None:
    """Binding a port below 1024 takes CAP_NET_BIND_SERVICE over the network namespace, which
    root inside lacks once in its user namespace (the host's owns the network namespace), and
    other uids inside never have: in the container's own network namespace no port is
    privileged (as Docker does), so a server under test can take port 80."""
    linux.write_file("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")
    # and ping (ICMP echo sockets) for every group, without CAP_NET_RAW, as Docker does
    linux.write_file("/proc/sys/net/ipv4/ping_group_range", f"0 {2**31 - 1}")


def join_cgroup(cgroup: Cgroup, pid: int) -> None:
    try:
        cgroup.join(pid)
    except MinictrError as error:
        raise ContainerSetupError(str(error), "join cgroup") from None


def be_init(spec: ContainerSpec, fds: ChildFds, forwarder: "SignalForwarder", parent_pidfd: int,
            userns: UserNamespace | None, watch: mounts.HostMountWatch | None = None,
            inside_user_namespace: bool = False) -> int:
    """PID 1's life: enter the container, spawn the command, reap until it exits, report.
    `userns`: the launcher's user namespace, entered last when the spec asks for one.
    `watch`: a spare's (see mounts): its mounts are prepared, unless the host's changed."""
    # Not dumpable: /proc/1/fd and /proc/1/mem are then closed to a command without
    # CAP_SYS_PTRACE over us (our pipes to the launcher are behind them).
    linux.set_dumpable(False)
    if inside_user_namespace:  # the keeper made our mount namespace
        mounts.prepare(unshare=False)
    else:
        if watch.changed():
            watch.go_back()
            mounts.prepare()
        watch.close()  # (a way back to the host's mounts has no place in a container's init)
    host_paths = mounts.HostPaths.open(spec)
    layer_lock = lock_layer(host_paths.layer)
    mounts.size_stage(spec.layer_size)
    layer = os.statvfs(mounts.layer_path(host_paths.layer))
    entered = userns if spec.user_namespace and not inside_user_namespace else None
    enter_container(spec, host_paths, entered, inside_user_namespace)
    layer_size = layer.f_blocks * layer.f_frsize
    confine(spec, layer_size, entered, parent_pidfd)
    command_pid = spawn_command(spec, fds)
    forwarder.start(command_pid)
    for fd in fds.stdio() + (fds.setup,):
        os.close(fd)
    put_dev_null_on_stdio()
    wait_status = reap_until(command_pid)
    kill_the_rest()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    _write_line(fds.status, {"command": wait_status,
                             "cpu_time": usage.ru_utime + usage.ru_stime})
    del layer_lock
    return 0


def confine(spec: ContainerSpec, layer_size: int, userns: UserNamespace | None,
            parent_pidfd: int) -> None:
    """The last steps before the command (see `security`): limits, as host root; root of the
    user namespace; then capabilities and seccomp."""
    security.limit_resources(spec.security, layer_size)
    if userns is not None:
        attempt("enter the user namespace", security.enter_user_namespace, userns.fd)
        arm_parent_death_signal(parent_pidfd)  # the id switch disarmed it
        if security.NETWORK_CAPABILITIES & set(spec.security.capabilities):
            attempt("make a network namespace of its own", own_network, spec.network)
    security.drop_privileges(spec.security)


def lock_layer(layer_fd: int | None) -> int | None:
    """Two overlays on one upper dir at once corrupt each other: a kept layer is locked for
    the container's life (the lock goes with our last fd, at our exit). The previous user of
    the layer may still be exiting (its result is reported first): it gets a moment."""
    if layer_fd is None:
        return None
    fd = os.open(f"/proc/self/fd/{layer_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + LAYER_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ContainerSetupError("the layer directory is in use by another running "
                                          "container; give each running container its own",
                                          "lock the layer", errno.EBUSY) from None
            time.sleep(0.001)


def put_dev_null_on_stdio() -> None:
    """Our own fds 0-2 came from the launcher: whatever it had (the caller's stderr) must not
    be reachable through /proc/1/fd by the command."""
    null = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)


def enter_container(spec: ContainerSpec, host_paths: mounts.HostPaths,
                    userns: UserNamespace | None, inside_user_namespace: bool) -> None:
    """Mounts, hostname, network, then pivot_root into the new root and chdir to `cwd`."""
    root = mounts.build_root(spec, host_paths, userns, inside_user_namespace)
    host_paths.close()
    attempt("set hostname", socket.sethostname, spec.hostname)
    if spec.network == "loopback":
        attempt("bring up loopback", linux.set_link_up, "lo")
    mounts.enter_root(root)
    attempt(f"chdir to cwd={spec.cwd!r}", os.chdir, spec.cwd)


def spawn_command(spec: ContainerSpec, fds: ChildFds) -> int:
    env = dict(spec.env)
    program = find_program(spec.argv[0], env.get("PATH", ""))
    # only 0-2 may reach the command (CVE-2024-21626: a leaked fd of a host directory is a
    # way out of any root); dup2 onto 0-2 clears the flag on those
    attempt("close descriptors on exec", linux.mark_fds_close_on_exec, 3)
    try:
        return os.posix_spawn(
            program, spec.argv, env,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, target)
                          for target, fd in enumerate(fds.stdio())],
            setsid=True, setsigmask=(), setsigdef=RESET_SIGNALS)
    except OSError as error:
        raise _exec_failure(program, error) from None


class SignalForwarder:
    """Passes forwarded signals to the command. Signals stay blocked until the command's pid
    is known, so none arriving in between is lost (the command starts with an empty mask)."""

    def __init__(self) -> None:
        self.target = 0
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)

    def start(self, target: int) -> None:
        self.target = target
        # _signal's, not signal's: that one makes the previous mask into 50-odd Signals
        # enums we have no use for (50 us, on the path of every container)
        _signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)

    def _forward(self, signum: int, _frame) -> None:
        try:
            os.kill(self.target, signum)
        except ProcessLookupError:
            pass


def reap_until(command_pid: int) -> int:
    """Reap every child (orphans come to PID 1) until the command itself exits."""
    while True:
        pid, wait_status = os.waitpid(-1, 0)
        if pid == command_pid:
            return wait_status


def kill_the_rest() -> None:
    """The command is done: kill and reap what it left behind before reporting its end, so
    that a caller told "finished" finds nothing of the container still running."""
    try:
        os.kill(-1, signal.SIGKILL)  # from PID 1: every other process of the namespace
    except ProcessLookupError:
        return
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def find_program(name: str, search_path: str) -> str:
    if "/" in name:
        return name
    for directory in search_path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CommandNotFoundError(f"command {name!r} not found in the container "
                               f"(PATH={search_path})", "exec", 2)


def _exec_failure(program: str, error: OSError) -> ContainerSetupError:
    message = f"cannot execute {program!r} in the container: {error.strerror}"
    if error.errno not in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR):
        # E2BIG, EAGAIN (pids_limit reached), ENOMEM...: not a missing command
        return ContainerSetupError(message, "exec", error.errno)
    if error.errno == errno.ENOENT and os.path.lexists(program):
        # ENOENT for a file that exists: the ELF loader or the #! interpreter is missing
        message += " (its interpreter or dynamic loader is missing from the rootfs)"
    elif error.errno in (errno.ENOENT, errno.ENOTDIR):
        message = f"command {program!r} not found in the container's rootfs"
    return CommandNotFoundError(message, "exec", error.errno)


# ---------------------------------------------------------------------------------------------
# Shared by the keeper and the init

def die_with_parent(parent_pidfd: int, keep: tuple[int, ...]) -> None:
    """Arm PR_SET_PDEATHSIG, then check through its pidfd that the parent did not die before
    it was armed (getppid() says 0 for any parent outside our PID namespace). Also close
    what we inherited from the launcher: other containers' pipes, its socket. A child runs
    no garbage collection: it is short-lived, and a collection would copy shared pages."""
    gc.disable()
    arm_parent_death_signal(parent_pidfd)
    linux.close_fds_except((*keep, parent_pidfd))


def arm_parent_death_signal(parent_pidfd: int) -> None:
    if not linux.arm_parent_death_signal(parent_pidfd):
        os._exit(1)


def report_failure(fd: int, error: BaseException) -> None:
    if isinstance(error, ContainerSetupError):
        failure = error
    elif isinstance(error, OSError):
        failure = ContainerSetupError(str(error), "setup", error.errno)
    else:
        failure = ContainerSetupError(f"{type(error).__name__}: {error}", "setup")
    try:
        _write_line(fd, {"error": {"type": type(failure).__name__, "message": str(failure),
                                   "step": failure.step, "errno": failure.errno}})
    except OSError:
        pass  # nobody listens any more: the launcher has gone


def _write_line(fd: int, message: dict) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")
