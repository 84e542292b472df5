"""What runs in a container's forked children, on their way to execve: the init (PID 1 of the
container), the keeper (without root) and the exec helper.

The init builds the mounts, pivot_roots and spawns the command, then does what the kernel asks
of a PID 1: orphans are reparented to it (someone has to reap them), and signals reach it only
if it installed a handler (so it forwards SIGTERM and friends to the command, which could not
be stopped gently otherwise). When the command exits, the init exits, and the kernel kills
every process left in the namespace, even those that detached with setsid(); the init's exit
is reported to its parent only after they are all gone.

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
import json
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from typing import NoReturn

from pytest_minictr import protocol
from pytest_minictr.container import mounts, security
from pytest_minictr.errors import CommandNotFoundError, ContainerSetupError, MinictrError
from pytest_minictr.host import idmap, linux
from pytest_minictr.host.cgroups import Cgroup
from pytest_minictr.host.idmap import UserNamespace
from pytest_minictr.host.linux import attempt
from pytest_minictr.protocol import FORWARDED_SIGNALS
from pytest_minictr.spec import ContainerSpec

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
class ExecTarget:
    """A running container another command joins: our child of it (its init; or its keeper,
    which holds the same namespaces and, unlike the init, lets our uid read them) and its
    cgroup."""

    child_pid: int
    cgroup: Cgroup | None



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
