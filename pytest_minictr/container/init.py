"""PID 1 of a container, and what runs the command: spawned, its signals forwarded, every
process it leaves reaped, its end reported.

The init is the last step of the container's setup plan (`plan`, carried out by `executor`).
It does what the kernel asks of a PID 1: orphans are reparented to it (someone has to reap
them), and signals reach it only if it installed a handler (so it forwards SIGTERM and friends
to the command, which could not be stopped gently otherwise). When the command exits, the init
kills what is left, reports, and exits; the kernel then tears the namespaces down.

The command is started with posix_spawn (vfork-style, no copy of our memory, no Python running
in the child); it gets a new session (no controlling terminal to push input into:
CVE-2017-5226), stdio, default signal dispositions and an empty signal mask.

Each of our processes dies with its parent (PR_SET_PDEATHSIG), so a killed launcher takes its
containers along. The init (and a keeper, an exec helper) write the command's (and the init's)
wait status as a JSON line to a "status" pipe.
"""

from __future__ import annotations

import _signal
import errno
import fcntl
import gc
import os
import resource
import signal
import socket
import termios
from dataclasses import dataclass
from typing import NoReturn

from pytest_minictr.container.failure import attempt, write_line
from pytest_minictr.errors import CommandNotFoundError, ContainerSetupError
from pytest_minictr.host import linux
from pytest_minictr.protocol import FORWARDED_SIGNALS

# Signals reset to their default in the command. exec resets handled ones, not ignored ones
# (Python ignores SIGPIPE and SIGXFSZ, the launcher SIGINT): all of them, rather than asking
# which are ignored (65 lookups: a tenth of a millisecond in a freshly forked init).
RESET_SIGNALS = tuple(sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}))


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


def run_command_as_init(argv: tuple[str, ...], env: tuple[tuple[str, str], ...], fds: ChildFds,
                        signal_proxy: SignalProxy, terminal: bool = False) -> NoReturn:
    """PID 1's life once the container is built: spawn the command, reap until it exits,
    kill what it left, report its end, exit."""
    command_pid = spawn_command(argv, env, fds, terminal)
    signal_proxy.start(command_pid)
    for fd in (*fds.stdio(), fds.setup):
        os.close(fd)
    put_dev_null_on_stdio()
    wait_status = reap_until(command_pid)
    kill_the_rest()
    report_end(fds.status, wait_status)
    os._exit(0)


def run_command_beside(argv: tuple[str, ...], env: tuple[tuple[str, str], ...],
                       fds: ChildFds, terminal: bool = False) -> NoReturn:
    """An exec helper's end: spawn the command (into the container's PID namespace, as
    pid_for_children), report its pid, wait, report its status. We stay outside that PID
    namespace: if the container ends, the kernel kills the command, and we report that."""
    command_pid = spawn_command(argv, env, fds, terminal)
    write_line(fds.setup, {"pid": command_pid})
    for fd in (*fds.stdio(), fds.setup):
        os.close(fd)
    _, wait_status = os.waitpid(command_pid, 0)
    report_end(fds.status, wait_status)
    os._exit(0)


def report_end(status_fd: int, wait_status: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    write_line(status_fd, {"command": wait_status, "cpu_time": usage.ru_utime + usage.ru_stime})


def put_dev_null_on_stdio() -> None:
    """Our own fds 0-2 came from the launcher: whatever it had (the caller's stderr) must not
    be reachable through /proc/1/fd by the command."""
    null = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)


def spawn_command(argv: tuple[str, ...], env_pairs: tuple[tuple[str, str], ...],
                  fds: ChildFds, terminal: bool = False) -> int:
    env = dict(env_pairs)
    program = find_program(argv[0], env.get("PATH", ""))
    # only 0-2 may reach the command (CVE-2024-21626: a leaked fd of a host directory is a
    # way out of any root); dup2 onto 0-2 clears the flag on those
    attempt("close descriptors on exec", linux.mark_fds_close_on_exec, 3)
    if terminal:
        return spawn_on_terminal(program, argv, env, fds)
    try:
        return os.posix_spawn(
            program, argv, env,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, target)
                          for target, fd in enumerate(fds.stdio())],
            setsid=True, setsigmask=(), setsigdef=RESET_SIGNALS)
    except OSError as error:
        raise _exec_failure(program, error) from None


def open_terminal(fds: ChildFds) -> None:
    """`minictr run -t`: a pseudo-terminal of the container's own devpts instance, its master
    sent back on the console socket the caller gave as stdin (SCM_RIGHTS, as runc's
    --console-socket), its slave put in place of stdin, stdout and stderr. So ttyname(),
    `tty` and `ps` find it as /dev/pts/N inside, which a pty of the host's devpts never is;
    and no host pty, nor the host's devpts, enters the container."""
    master, slave = attempt("open /dev/ptmx", linux.open_pty)
    try:
        with socket.socket(fileno=os.dup(fds.stdin)) as console:
            attempt("send the terminal to the caller", socket.send_fds, console, [b"pty"],
                    [master])
    finally:
        os.close(master)  # the caller's now: none of ours may keep it
    for fd in fds.stdio():
        os.dup2(slave, fd, inheritable=False)
    os.close(slave)


def spawn_on_terminal(program: str, argv: tuple[str, ...], env: dict[str, str],
                      fds: ChildFds) -> int:
    """The command of `minictr run -t`: a session leader whose controlling terminal is the
    pseudo-terminal on its stdin (the container's own, see `open_terminal`), so that a shell
    gets job control and the terminal's ^C reaches its foreground group.
    posix_spawn cannot set a controlling terminal (TIOCSCTTY): a fork, which an interactive
    command can afford. An exec failure comes back as its errno on a close-on-exec pipe."""
    failed, report = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child execs or exits)
        try:
            os.close(failed)
            os.setsid()
            fcntl.ioctl(fds.stdin, termios.TIOCSCTTY, 0)
            for target, fd in enumerate(fds.stdio()):
                os.dup2(fd, target)
            for signum in RESET_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            os.execve(program, argv, env)
        except OSError as error:
            os.write(report, str(error.errno).encode())
        os._exit(127)
    os.close(report)
    with os.fdopen(failed, "rb") as pipe:
        code = pipe.read()
    if code:
        os.waitpid(pid, 0)
        number = int(code)
        raise _exec_failure(program, OSError(number, os.strerror(number)))
    return pid


class SignalProxy:
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
        # enums we have no use for, on the path of every container
        _signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)

    def _forward(self, signum: int, _frame: object) -> None:
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
# Shared by every process of a container

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
