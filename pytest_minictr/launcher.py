"""The process choreography of one container, as run in the launcher's forked children.

Three processes per container, each a fork of the (small, single-threaded) launcher:

    launcher ── keeper ── init ── command

The keeper stays in the host's PID namespace: it unshares the other namespaces, forks the init
and waits for it. The init is PID 1 of the new PID namespace: it builds the mounts, pivot_roots,
forks the command and then does what the kernel asks of a PID 1: orphans are reparented to it
(someone has to reap them), and signals reach it only if it installed a handler (so it forwards
SIGTERM and friends to the command, which otherwise could not be stopped gently). When the
command exits, the init exits, and the kernel kills every process left in the namespace, even
those that detached with setsid(); the keeper's wait() returns only after they are all gone.

Each process dies with its parent (PR_SET_PDEATHSIG), so a killed launcher takes its containers
along. Failures before exec travel to the launcher as one JSON line on a close-on-exec "setup"
pipe; its end of file, once every copy is closed, means the command was executed. The init and
the keeper write the command's and the init's wait status to a "status" pipe.

Every function here ends in os._exit(): a forked child must never return into the launcher.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
from dataclasses import dataclass
from typing import NoReturn

from . import linux, mounts
from .errors import CommandNotFoundError, ContainerSetupError
from .linux import attempt
from .spec import ContainerSpec

# Signals the init passes on to the command: what `stop()`, a terminal or a user sends.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)
_ALL_FDS = 0x7FFFFFFF


@dataclass(frozen=True)
class ChildFds:
    """The descriptors a container's processes inherit from the launcher; all others are closed."""

    stdin: int
    stdout: int
    stderr: int
    setup: int     # write end of the setup pipe (close-on-exec)
    status: int    # write end of the status pipe (close-on-exec)

    def stdio(self) -> tuple[int, int, int]:
        return self.stdin, self.stdout, self.stderr


def namespace_flags(spec: ContainerSpec) -> int:
    flags = (linux.CLONE_NEWPID | linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
             | linux.CLONE_NEWNET)
    return flags | linux.CLONE_NEWUSER if spec.user_namespace else flags


# ---------------------------------------------------------------------------------------------
# The keeper: outside the PID namespace, it owns the namespaces and watches the init die.

def run_keeper(spec: ContainerSpec, fds: ChildFds, launcher_pid: int) -> NoReturn:
    code = 1
    try:
        close_fds_except(fds.stdio() + (fds.setup, fds.status))
        die_with_parent(lambda: os.getppid() == launcher_pid)
        uid, gid = os.geteuid(), os.getegid()
        attempt("unshare namespaces", linux.unshare, namespace_flags(spec))
        if spec.user_namespace:
            attempt("write uid/gid maps", write_id_maps, uid, gid)
        keeper_pidfd = os.pidfd_open(os.getpid())
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        init_pid = os.fork()
        if init_pid == 0:
            run_init(spec, fds, keeper_pidfd)
        os.close(keeper_pidfd)
        _write_line(fds.setup, {"pid": init_pid})
        for fd in fds.stdio() + (fds.setup,):
            os.close(fd)
        _, wait_status = os.waitpid(init_pid, 0)
        _write_line(fds.status, {"init": wait_status})
        code = 0
    except BaseException as error:  # noqa: BLE001 - everything must reach the caller
        report_failure(fds.setup, error)
    finally:
        os._exit(code)


def write_id_maps(uid: int, gid: int) -> None:
    """Map container root to our own ids. A single-id map is all the kernel lets a process
    write for itself, and a gid map needs setgroups denied first (CVE-2014-8989)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"),
                       ("gid_map", f"0 {gid} 1\n")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# The init: PID 1 of the container.

def run_init(spec: ContainerSpec, fds: ChildFds, keeper_pidfd: int) -> NoReturn:
    code = 1
    try:
        # getppid() is 0 for a parent outside our PID namespace, so ask the keeper's pidfd
        die_with_parent(lambda: not select.select([keeper_pidfd], [], [], 0)[0])
        os.close(keeper_pidfd)
        rootfs_fd, source_fds = mounts.open_host_paths(spec)
        root = mounts.build_root(spec, rootfs_fd, source_fds)
        attempt("set hostname", socket.sethostname, spec.hostname)
        if spec.network == "loopback":
            attempt("bring up loopback", linux.set_link_up, "lo")
        mounts.enter_root(root)
        for fd in [rootfs_fd, *source_fds.values()]:
            os.close(fd)
        forwarder = SignalForwarder()
        command_pid = os.fork()
        if command_pid == 0:
            run_command(spec, fds)
        forwarder.start(command_pid)
        for fd in fds.stdio() + (fds.setup,):
            os.close(fd)
        wait_status = reap_until(command_pid)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        _write_line(fds.status, {"command": wait_status,
                                 "cpu_time": usage.ru_utime + usage.ru_stime})
        code = 0
    except BaseException as error:  # noqa: BLE001
        report_failure(fds.setup, error)
    finally:
        os._exit(code)


class SignalForwarder:
    """Passes forwarded signals to the command. Signals stay blocked from before the fork
    until the command's pid is known, so none arriving in between is lost."""

    def __init__(self) -> None:
        self.target = 0
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)

    def start(self, target: int) -> None:
        self.target = target
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)

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


# ---------------------------------------------------------------------------------------------
# The command: a new session (no controlling terminal to push input into: CVE-2017-5226),
# stdio, clean signals, cwd, exec.

def run_command(spec: ContainerSpec, fds: ChildFds) -> NoReturn:
    try:
        os.setsid()
        for target, fd in enumerate(fds.stdio()):
            os.dup2(fd, target)
        close_fds_except((0, 1, 2, fds.setup))
        reset_signal_dispositions()
        attempt(f"chdir to {spec.cwd}", os.chdir, spec.cwd)
        env = dict(spec.env)
        program = find_program(spec.argv[0], env.get("PATH", ""))
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        try:
            os.execve(program, spec.argv, env)
        except OSError as error:
            raise _exec_failure(program, error) from None
    except BaseException as error:  # noqa: BLE001
        report_failure(fds.setup, error)
    finally:
        os._exit(127)


def find_program(name: str, search_path: str) -> str:
    if "/" in name:
        return name
    for directory in search_path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CommandNotFoundError(f"command {name!r} not found in the container "
                               f"(PATH={search_path})", "exec", 2)


def _exec_failure(program: str, error: OSError) -> CommandNotFoundError:
    message = f"cannot execute {program!r} in the container: {error.strerror}"
    if error.errno == 2 and os.path.lexists(program):
        # ENOENT for a file that exists: the ELF loader or the #! interpreter is missing
        message += " (its interpreter or dynamic loader is missing from the rootfs)"
    elif error.errno == 2:
        message = f"command {program!r} not found in the container's rootfs"
    return CommandNotFoundError(message, "exec", error.errno)


def reset_signal_dispositions() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; an exec'd program must start with the defaults."""
    for signum in signal.valid_signals():
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# Shared by the three processes

def die_with_parent(parent_still_there) -> None:
    """Arm PR_SET_PDEATHSIG, then check the parent did not die before it was armed."""
    linux.set_parent_death_signal(signal.SIGKILL)
    if not parent_still_there():
        os._exit(1)


def close_fds_except(keep) -> None:
    """Close every descriptor from 3 up but `keep` (close_range(2) under the hood)."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, _ALL_FDS)


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
