"""Messages between the caller and its launcher: length-prefixed JSON over a Unix stream socket,
with file descriptors riding along (SCM_RIGHTS) on the first byte of a message.

A stream socket rather than SOCK_SEQPACKET because a spec's argv and env can approach
ARG_MAX (2 MiB), beyond what one datagram may carry.

The requests the launcher answers are declared once, in `REQUESTS`: the client sends them
by these names, the launcher's server dispatches on the same table. An error crosses the
socket (or a setup pipe) as `error_fields()` and comes back as its class with `error_of()`.

Also the reports a container's processes send the launcher (`SetupReport`, `EndReport`): the
wire format both sides keep to, parsed in one place.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pytest_minictr import errors

# Signals the init passes on to the command: every one a sender may mean for the command. Not
# those that cannot be caught, SIGCHLD (the init's own business), nor the faults the kernel
# sends a process about itself.
FORWARDED_SIGNALS = tuple(sorted(set(signal.valid_signals()) - {
    signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
    signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS}))

_HEADER = struct.Struct("!I")
MAX_FDS = 8


def send_message(sock: socket.socket, message: Any, fds: Sequence[int] = ()) -> None:
    send_payload(sock, json.dumps(message, separators=(",", ":")).encode(), fds)


def send_payload(sock: socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    """One message already encoded (a setup plan: see container.plan.encode)."""
    data = _HEADER.pack(len(payload)) + payload
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_message(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """The next message and the fds that came with it, or None at end of stream."""
    received = recv_payload(sock)
    return None if received is None else (json.loads(received[0]), received[1])


def recv_payload(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """The next message as it was sent, and the fds that came with it, or None at end of
    stream. The fds are close-on-exec: one that leaked into a command would hold its pipe
    open for its lifetime."""
    header, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, MAX_FDS)
    for fd in fds:  # (MSG_CMSG_CLOEXEC, tried first, is not honoured on every kernel)
        os.set_inheritable(fd, False)
    if not header:
        return None
    header += _recv_exactly(sock, _HEADER.size - len(header))
    (length,) = _HEADER.unpack(header)
    return _recv_exactly(sock, length), fds


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("launcher socket closed in the middle of a message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class ReplyReader:
    """The caller's side of the stream: whole replies, even when reading them is interrupted.

    A signal handler that raises (KeyboardInterrupt, pytest-timeout) can cut a read short;
    what was read stays here, so the next read goes on from there and the stream stays in
    step. Each reply carries the `seq` of its request, by which the client matches it (see
    `client.LauncherClient`).
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = b""

    def next_reply(self) -> Any | None:
        """The next reply, whichever request it answers; None at the end of the stream."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buffer)
                end = _HEADER.size + length
                if len(self._buffer) >= end:
                    payload, self._buffer = self._buffer[_HEADER.size:end], self._buffer[end:]
                    return json.loads(payload)
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                return None
            self._buffer += chunk


# --- the requests the launcher answers ----------------------------------------------------------
#
# Each request is {"op": NAME, "seq": N, FIELD: value...}, answered in order by
# {"ok": true, "seq": N, REPLY FIELD: value...} or {"ok": false, "seq": N, "error": ERROR}
# (ERROR: error_fields()). The client's call() returns the first or raises the second.

RUN, EXEC, SIGNAL, STOP, STATS = "run", "exec", "signal", "stop", "stats"
POD, END_POD, PROBE = "pod", "end_pod", "probe"
SANDBOX, WATCH = "sandbox", "watch"


@dataclass(frozen=True)
class Request:
    """One request: the fields it sends, the fds riding along, the fields of its reply."""

    fields: tuple[str, ...]
    reply: tuple[str, ...]
    does: str
    fds: tuple[str, ...] = ()


STDIO_FDS = ("stdin", "stdout", "stderr", "events")
REQUESTS = {
    RUN: Request(("id", "spec"), ("pid", "ports"), "start a container of `spec` (a "
                 "ContainerSpec.to_dict()); `ports`, only where it publishes some or joins a "
                 "pod: [[container port, host address, host port]]", STDIO_FDS),
    EXEC: Request(("id", "container", "spec"), ("pid",), "another command inside a running "
                  "container: then signalled, stopped and reported by its own `id`, like a "
                  "container", STDIO_FDS),
    SIGNAL: Request(("id", "signum"), ("running",), "passed to the container's init, which "
                    "forwards it"),
    STOP: Request(("id", "grace"), ("running",), "SIGTERM now, SIGKILL of the whole tree after "
                  "`grace` seconds (0: at once)"),
    STATS: Request(("id",), ("stats",), "the cgroup's figures now: memory_current, "
                   "memory_peak, cpu_time, oom_killed, processes"),
    POD: Request(("pod", "ports"), ("ports",), "a pod, its ports bound (see launcher.pods)"),
    END_POD: Request(("pod",), (), "a pod no container joined goes (one ends with its last)"),
    PROBE: Request(("id", "port"), ("errno",), "0 if the port accepts a connection inside "
                   "the container's network namespace, else the errno of the attempt"),
    SANDBOX: Request(("id", "limits", "timeout", "services"), ("init_pid", "cgroup_procs"),
                     "a cgroup with `limits` for a sandboxed test body (see launcher.sandboxes); "
                     "as root, `init_pid` is the spare whose namespaces it joins; `services` "
                     "([[address, port]]) the body reaches through a relay on the host, which "
                     "takes the body's listeners on the fd `relay` (see launcher.pods)",
                     ("events", "relay")),
    WATCH: Request(("id", "pid"), (), "watch the body forked into a sandbox (None: the fork "
                   "failed); its end goes to the sandbox's events pipe"),
}


def error_fields(error: errors.MinictrError) -> dict[str, Any]:
    """An error as it crosses to another process (`error_of` makes it an error again)."""
    fields: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, errors.ContainerSetupError):
        fields.update(step=error.step, errno=error.errno, phase=error.phase)
    return fields


def error_of(fields: Mapping[str, Any]) -> errors.MinictrError:
    """The error another process sent, as the class of `errors` it was there; a type this
    side does not know is a LauncherError."""
    kind = getattr(errors, fields.get("type", ""), None)
    message = fields["message"]
    if isinstance(kind, type) and issubclass(kind, errors.ContainerSetupError):
        # (the native core sends a null phase where a step has none)
        return kind(message, fields.get("step") or "", fields.get("errno"),
                    fields.get("phase") or "")
    if isinstance(kind, type) and issubclass(kind, errors.MinictrError):
        return kind(message)
    return errors.LauncherError(message)


# --- what a container's processes report to the launcher ----------------------------------------
#
# JSON lines on two close-on-exec pipes, written by the container side (see container.init):
#   setup pipe:  {"pid": N} (a keeper or an exec helper: the process to signal) or
#                {"error": {"type", "message", "step", "errno"}} (what failed before the command)
#   status pipe: {"command": wait_status, "cpu_time": seconds} from the init once the command
#                and all it left are reaped; {"init": wait_status} from a keeper.

# The keys a report may hold and the type of each: a line with anything else is dropped (the
# command may have written it, see container.init.run_command_as_init), never trusted or fatal.
_REPORT_TYPES: dict[str, type | tuple[type, ...]] = {
    "command": int, "init": int, "pid": int, "cpu_time": (int, float), "error": dict}


def parse_report_line(line: bytes) -> dict[str, Any]:
    """The fields of one report line; {} for a line that is not a well-formed report."""
    try:
        report = json.loads(line)
    except ValueError:
        return {}
    if not isinstance(report, dict) or not all(
            isinstance(value, _REPORT_TYPES.get(key, ())) and not isinstance(value, bool)
            for key, value in report.items()):
        return {}
    return report


@dataclass(frozen=True)
class SetupReport:
    """What the setup pipe said by its end of file: the pid to signal (if not our child's
    own), or what failed. A later line overrides an earlier one."""

    pid: int | None = None
    error: dict[str, Any] | None = None

    @classmethod
    def parse(cls, data: bytes) -> SetupReport:
        report = cls()
        for line in data.splitlines():
            fields = parse_report_line(line)
            report = cls(fields.get("pid", report.pid), fields.get("error", report.error))
        return report


@dataclass(frozen=True)
class EndReport:
    """What the status pipe has said so far about a container's end."""

    command_status: int | None = None  # the command's wait status, from the init
    init_status: int | None = None     # the init's wait status, from a keeper (or our waitpid)
    cpu_time: float | None = None      # seconds, the command and all it started, reaped

    @property
    def command_ended(self) -> bool:
        return self.command_status is not None

    def adding(self, line: bytes) -> EndReport:
        """This report with one more line's fields (a later line overrides an earlier one)."""
        fields = parse_report_line(line)
        return EndReport(fields.get("command", self.command_status),
                         fields.get("init", self.init_status),
                         fields.get("cpu_time", self.cpu_time))

    def with_child_status(self, wait_status: int) -> EndReport:
        """With our child's own wait status: the init's, unless a keeper (our child then)
        reported the init's."""
        return self if self.init_status is not None else replace(self, init_status=wait_status)

    @property
    def returncode(self) -> int:
        """The command's status as subprocess reports it (negative: killed by that signal).
        Without the init's report the init was killed, taking the command with it."""
        if self.command_status is not None:
            return os.waitstatus_to_exitcode(self.command_status)
        if self.init_status is not None and os.WIFSIGNALED(self.init_status):
            return -os.WTERMSIG(self.init_status)
        return -signal.SIGKILL
