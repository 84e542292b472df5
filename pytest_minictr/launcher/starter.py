"""Starting containers, in the launcher process: on a spare (see `spares`), in a keeper
without root, or in an exec helper; the cgroup and limits of each.

A container is an init process, PID 1 of a new PID namespace, and the command it spawns:

    launcher ── init ── command                      (the caller is root: the usual case)
    launcher ── keeper ── init ── command            (the caller is not root)

As root, inits are forked ahead of need as spares by the launcher's zygote (see `spares`),
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
from dataclasses import dataclass, replace

from pytest_minictr import native, protocol
from pytest_minictr.container import plan, seccomp
from pytest_minictr.container.init import ChildFds
from pytest_minictr.container.plan import JOINED_NAMESPACES, Where
from pytest_minictr.errors import (
    ConfigError,
    ContainerNotFoundError,
    MinictrError,
    UnsupportedError,
)
from pytest_minictr.host import cgroups, idmap, linux, proc
from pytest_minictr.host.cgroups import Cgroup, NullCgroup
from pytest_minictr.host.idmap import UserNamespace
from pytest_minictr.launcher.spares import Spare, SparePool, where_in
from pytest_minictr.spec import ContainerSpec, Limits

PLANS_KEPT = 32  # specs whose plan is kept encoded (see Starter._encoded_plan)


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
    """Lives in the launcher process: starts containers and returns the pid to watch. As
    root, what a container needs before its spec is known is done ahead by its spare."""

    def __init__(self) -> None:
        # Both are inherited by every child: how an init checks that we are alive, and the
        # way back to our own PID namespace after forking into a new one.
        self.own_pidfd = os.pidfd_open(os.getpid())
        own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.rootless = os.geteuid() != 0
        self.cgroups = cgroups.detect_or_null()
        cgroups.reap_stale(self.cgroups)  # what dead launchers left
        self.userns, self.userns_problem = (None, None) if self.rootless else _user_namespace()
        self.subordinate_ids = _subordinate_ids() if self.rootless else None
        # what a container's plan needs to know of us, but its cgroup (see spares.where_in)
        self.where = Where(rootless=self.rootless) if self.userns is None else Where(
            userns_fd=self.userns.fd, host_ids=(self.userns.host_uid, self.userns.host_gid))
        if os.uname().machine in seccomp.ARCHITECTURES:
            seccomp.host_filter()  # the default program, inherited by every init we fork
        self._serial = itertools.count(1)
        self._plans: dict[ContainerSpec, bytes] = {}  # see _encoded_plan, oldest first
        # last: the zygote is a copy of us as we are now, and each spare a copy of it
        self.spares = SparePool(
            own_pidfd=self.own_pidfd, own_pid_namespace=own_pid_namespace,
            userns_fds=() if self.userns is None else (self.userns.fd,), where=self.where,
            cgroups=self.cgroups, new_cgroup=self._new_cgroup,
            native_program=native.native_program(), rootless=self.rootless)

    def start(self, spec: ContainerSpec, fds: ChildFds,
              joins: tuple[int, ...] | None = None) -> Started:
        """Start a container: hand its plan to a spare (root), or fork a keeper that carries
        out the whole plan (not root). `joins`: the namespace fds of the pod it joins (see
        `launcher.pods`): the network namespace, and without root the user namespace before it."""
        self._check_limits(spec.limits)
        self._check_cpu_time(spec)
        self._check_ids(spec)
        if spec.user_namespace and self.userns_problem is not None:
            raise UnsupportedError(f"no user namespace for the container: {self.userns_problem}"
                                   " (user=False runs it as host root)")
        limits = _with_room_for_the_init(spec.limits)
        if self.rootless:
            return self._start_keeper(spec, fds, self._new_cgroup(limits), joins)
        spare = self.spares.take()
        try:
            if limits.any():
                _apply_limits(spare.cgroup, limits)
        except BaseException:
            self.spares.discard(spare)
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
            steps = plan.exec_plan(spec, where_in(self.where, target.cgroup), tuple(namespaces))
            keep = tuple(fd for fd in namespaces if fd is not None) \
                + (() if userns is None else (userns.fd,))
            pid = self.spares.run_plan(steps, fds, keep)
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
        spare = self.spares.take_prepared()
        try:
            if limits.any():
                _apply_limits(spare.cgroup, _with_room_for_the_init(limits))
        except BaseException:
            self.spares.discard(spare)
            raise
        return spare

    def shut_down(self) -> None:
        """Let the spares go, remove our cgroups' parents if they are empty."""
        self.spares.shut_down()
        self.cgroups.release()
        if self.userns is not None:
            os.close(self.userns.fd)

    def _start_keeper(self, spec: ContainerSpec, fds: ChildFds, cgroup: Cgroup,
                      joins: tuple[int, ...] | None = None) -> Started:
        """Fork the keeper. With subordinate ids, it stops after making its user namespace
        until we have mapped it in full from out here (only a process outside may). In a
        pod, it joins the pod's user namespace (mapped already) and network namespace."""
        # the handshake's pipes: the keeper's ends (ready to be mapped, go on), and ours
        theirs: tuple[int, int] | None = None
        ours: tuple[int, int] | None = None
        if self.subordinate_ids and joins is None:
            (ready_r, ready_w), (go_r, go_w) = os.pipe(), os.pipe()
            theirs, ours = (ready_w, go_r), (ready_r, go_w)
        where = replace(where_in(self.where, cgroup), id_maps=theirs)
        if joins is not None:
            where = replace(where, pod_userns=joins[0], pod_netns=joins[1])
        try:
            try:
                steps = plan.setup_plan(spec, where)
                pid = self.spares.run_plan(steps, fds, (theirs or ()) + (joins or ()))
            finally:
                linux.close_each(theirs or ())  # its exit must show as end of file
            if ours is not None:
                self._map_keeper(pid, *ours)
        except BaseException:
            cgroup.discard()
            raise
        finally:
            linux.close_each(ours or ())
        return Started(pid, cgroup, keeper=True)

    def _map_keeper(self, pid: int, ready: int, go: int) -> None:
        assert self.subordinate_ids is not None  # (a handshake is made only with them)
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
        encoded, for the last few specs (a start then spends a quarter of the time on its plan)."""
        key = replace(spec, argv=(), env=())
        head = self._plans.pop(key, None)
        if head is None:
            head = plan.encode(plan.completed_with(spec, self.where)[:-1])
        self._plans[key] = head
        if len(self._plans) > PLANS_KEPT:
            del self._plans[next(iter(self._plans))]
        return plan.encode_with(head, plan.run_command(spec))

    def _check_ids(self, spec: ContainerSpec) -> None:
        """`run_as` ids the container's user namespace does not map cannot be switched to
        (setresuid: EINVAL, past the whole setup): refused now, saying which ids are."""
        if spec.run_as is None or not spec.user_namespace:
            return  # host root's ids, every one of them
        mapped = idmap.MAPPED_IDS if not self.rootless or self.subordinate_ids else 1
        uid, gid = spec.run_as
        if uid < mapped and gid < mapped:
            return
        which = f"container ids 0-{mapped - 1} are" if mapped > 1 else (
            "without subordinate ids only container root, 0, is: newuidmap and newgidmap "
            "with ranges of yours in /etc/subuid and /etc/subgid map 1-65535; see `minictr "
            "doctor`")
        unmapped = f"uid {uid}" if uid >= mapped else f"gid {gid}"
        raise ConfigError(f"run_as='{uid}:{gid}': {unmapped} is not mapped in the container's "
                          f"user namespace ({which})")

    def _check_limits(self, limits: Limits) -> None:
        if limits.any():
            self.cgroups.check_limits(limits)

    def _check_cpu_time(self, spec: ContainerSpec) -> None:
        """A CPU-time limit is the cgroup's count of every process: RLIMIT_CPU alone (one
        process at a time, whole seconds) would let a program that forks use it many times
        over, so without that count the limit is refused, never kept halfway."""
        problem = None if spec.cpu_time_limit is None else self.cgroups.cpu_usage_problem()
        if problem is not None:
            raise UnsupportedError(f"cpu_time_limit={spec.cpu_time_limit:g} needs a cgroup that "
                                   f"counts the CPU time of the whole container: {problem}")

    def _new_cgroup(self, limits: Limits) -> Cgroup:
        return self.cgroups.create(cgroups.group_name(str(next(self._serial))), limits)

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
    try:
        opened = proc.open_namespaces(pid, [
            name for name, _ in JOINED_NAMESPACES
            if name not in skip and not proc.shares_namespace(pid, name)])
    except OSError:
        raise ContainerNotFoundError("the container is not running (it has just ended)") \
            from None
    return [opened.get(name) for name, _ in JOINED_NAMESPACES]

