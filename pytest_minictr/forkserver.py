"""The launcher process: a small, single-threaded server that forks containers for one caller.

Why a separate process: the caller is usually pytest, large (fork cost grows with its memory)
and often threaded (a forked child of a threaded process can deadlock on a lock some other
thread held). This process stays small and has one thread; it is started once per runtime
(`python -m pytest_minictr.forkserver FD`) and reused.

It speaks `protocol` over one socket. Requests, each answered in order:
  {"op": "run", "id", "spec"} + fds [stdin, stdout, stderr, events]  -> {"ok", "pid"} | error
  {"op": "signal", "id", "signum"}     -> passed to the container's init, which forwards it
  {"op": "stop", "id", "grace"}        -> SIGTERM now, SIGKILL of the whole tree after grace
When a container ends, one JSON line goes to its `events` pipe (returncode, how it ended, wall
and CPU time) and the pipe is closed. When the caller goes away (end of the socket), every
container is killed and the launcher exits: nothing outlives the caller.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from . import launcher, protocol
from .launcher import ChildFds
from .spec import ContainerSpec

SETUP_TIMEOUT = 60.0  # seconds a container may take from fork to exec before we give up


@dataclass
class Running:
    """One container, from its successful exec until its keeper is reaped."""

    id: str
    keeper_pid: int
    keeper_pidfd: int
    init_pidfd: int | None
    status_pipe: int
    events: int
    started: float
    timeout_at: float | None
    kill_at: float | None = None
    ended_by: str | None = None       # "timeout" | "stop" when we ended it
    signals: list[int] = field(default_factory=list)


class Forkserver:
    def __init__(self, control: socket.socket):
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ)
        self.containers: dict[str, Running] = {}

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select(self._seconds_to_next_deadline()):
                if key.fileobj is self.control:
                    if not self._handle_request():
                        self.shutdown()
                        return
                else:
                    self._finish(key.data)
            self._fire_deadlines(time.monotonic())

    # -- requests ------------------------------------------------------------------------------

    def _handle_request(self) -> bool:
        received = protocol.recv_message(self.control)
        if received is None:
            return False
        message, fds = received
        handler = getattr(self, f"_op_{message.get('op')}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown request {message.get('op')!r}")
            reply = handler(message, fds)
        except Exception as error:  # noqa: BLE001 - the caller must get an answer, not a hang
            for fd in fds:
                _close_quietly(fd)
            reply = {"ok": False, "error": {"type": "LauncherError",
                                            "message": f"{type(error).__name__}: {error}"}}
        protocol.send_message(self.control, reply)
        return True

    def _op_run(self, message: dict, fds: list[int]) -> dict:
        spec = ContainerSpec.from_dict(message["spec"])
        stdin, stdout, stderr, events = fds
        setup_r, setup_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        started = time.monotonic()
        keeper_pid = os.fork()
        if keeper_pid == 0:
            launcher.run_keeper(spec, ChildFds(stdin, stdout, stderr, setup_w, status_w),
                                os.getppid())
        for fd in (setup_w, status_w, stdin, stdout, stderr):
            os.close(fd)
        keeper_pidfd = os.pidfd_open(keeper_pid)
        init_pid, error = _read_setup(setup_r)
        init_pidfd = _pidfd_or_none(init_pid)
        if error is not None:
            _kill(init_pidfd)
            os.waitpid(keeper_pid, 0)
            for fd in (keeper_pidfd, status_r, events):
                os.close(fd)
            if init_pidfd is not None:
                os.close(init_pidfd)
            return {"ok": False, "error": error}
        container = Running(message["id"], keeper_pid, keeper_pidfd, init_pidfd, status_r,
                            events, started, started + spec.timeout if spec.timeout else None)
        self.containers[container.id] = container
        self.selector.register(keeper_pidfd, selectors.EVENT_READ, container)
        return {"ok": True, "pid": init_pid}

    def _op_signal(self, message: dict, _fds) -> dict:
        container = self._find(message["id"])
        if container is not None:
            _kill(container.init_pidfd, message["signum"])
        return {"ok": True, "running": container is not None}

    def _op_stop(self, message: dict, _fds) -> dict:
        container = self._find(message["id"])
        if container is not None:
            container.ended_by = container.ended_by or "stop"
            grace = float(message.get("grace", 0))
            if grace > 0:
                _kill(container.init_pidfd, signal.SIGTERM)
                kill_at = time.monotonic() + grace
                container.kill_at = min(container.kill_at or kill_at, kill_at)
            else:
                _kill(container.init_pidfd)
        return {"ok": True, "running": container is not None}

    def _find(self, container_id: str) -> Running | None:
        return self.containers.get(container_id)

    # -- time limits ---------------------------------------------------------------------------

    def _seconds_to_next_deadline(self) -> float | None:
        deadlines = [t for c in self.containers.values() for t in (c.timeout_at, c.kill_at)
                     if t is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _fire_deadlines(self, now: float) -> None:
        for container in self.containers.values():
            if container.timeout_at is not None and now >= container.timeout_at:
                container.ended_by = container.ended_by or "timeout"
                container.timeout_at = None
                _kill(container.init_pidfd)
            if container.kill_at is not None and now >= container.kill_at:
                container.kill_at = None
                _kill(container.init_pidfd)

    # -- the end of a container ----------------------------------------------------------------

    def _finish(self, container: Running) -> None:
        """The keeper exited, so the init and every process of the namespace are gone."""
        self.selector.unregister(container.keeper_pidfd)
        os.waitpid(container.keeper_pid, 0)
        wall_time = time.monotonic() - container.started
        reports = _read_lines(container.status_pipe)
        event = {"returncode": _returncode(reports), "ended_by": container.ended_by,
                 "wall_time": wall_time, "cpu_time": reports.get("cpu_time")}
        try:
            os.write(container.events, json.dumps(event).encode() + b"\n")
        except OSError:
            pass  # the caller closed its end: it no longer cares
        for fd in (container.keeper_pidfd, container.status_pipe, container.events,
                   container.init_pidfd):
            _close_quietly(fd)
        del self.containers[container.id]

    def shutdown(self) -> None:
        for container in list(self.containers.values()):
            _kill(container.init_pidfd)
        for container in list(self.containers.values()):
            self._finish(container)


def _read_setup(setup_r: int) -> tuple[int | None, dict | None]:
    """Read the setup pipe until every child closed it: the init's pid, or what failed."""
    lines = _read_lines(setup_r, SETUP_TIMEOUT)
    if "error" in lines:
        return lines.get("pid"), lines["error"]
    if "pid" not in lines:
        return None, {"type": "LauncherError",
                      "message": "the container's keeper died during setup"}
    return lines["pid"], None


def _read_lines(fd: int, timeout: float | None = None) -> dict:
    """Read JSON lines until end of file and merge them; `fd` is closed."""
    data = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if deadline is not None:
                if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    return {"error": {"type": "LauncherError",
                                      "message": f"container setup took over {timeout:g} s"}}
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    merged: dict = {}
    for line in data.splitlines():
        merged.update(json.loads(line))
    return merged


def _returncode(reports: dict) -> int:
    """The command's status as subprocess reports it (negative: killed by that signal)."""
    if "command" in reports:
        return os.waitstatus_to_exitcode(reports["command"])
    if "init" in reports and os.WIFSIGNALED(reports["init"]):
        return -os.WTERMSIG(reports["init"])
    return -signal.SIGKILL


def _pidfd_or_none(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _kill(pidfd: int | None, signum: int = signal.SIGKILL) -> None:
    """Signal through a pidfd: never a recycled pid."""
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # The caller decides what an interrupt means; a Ctrl-C must not kill us before we clean up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(args[0]))
    Forkserver(control).serve()


if __name__ == "__main__":
    main()
