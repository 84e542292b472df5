"""The caller's side of the launcher: start it once, send it requests, start a new one if it died.

The caller (pytest, a CLI, a grader) never forks a container itself; see `launcher.server`.
Every request goes through `LauncherClient.call()` (the requests: `protocol.REQUESTS`).
Requests may come from several threads: one lock serialises each request with its reply.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pytest_minictr import native, protocol
from pytest_minictr.errors import LauncherError

_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)  # what a dead launcher's socket says
# the directory that holds the package: pytest_minictr/caller/client.py, three levels up
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# -S: no site-packages scan, a faster start; the package's own directory goes on sys.path.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from pytest_minictr.launcher.server import main; main(sys.argv[2:])")


class LauncherClient:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self._replies: protocol.ReplyReader | None = None
        self._seq = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def call(self, op: str, *, fds: Sequence[int] = (), **fields: Any) -> dict[str, Any]:
        """Send the request `op` with its `fields` (see protocol.REQUESTS) and return the
        reply; an error the launcher answered with is raised as its class of `errors`. A
        launcher found dead is replaced first; one that dies while answering raises
        LauncherError (the next call starts a new one)."""
        reply = self._exchange({"op": op, **fields}, fds)
        if not reply["ok"]:
            raise protocol.error_of(reply["error"])
        return reply

    def _exchange(self, message: dict[str, Any], fds: Sequence[int]) -> dict[str, Any]:
        """One request sent, its reply (whatever it says) returned."""
        with self._lock:
            self._ensure_started()
            assert self._socket is not None and self._replies is not None  # it made them
            message = {**message, "seq": next(self._seq)}
            try:
                protocol.send_message(self._socket, message, fds)
            except OSError as error:
                if error.errno not in _GONE:
                    raise
                # It died since we last looked; the request never reached it, so resend once.
                self._restart()
                protocol.send_message(self._socket, message, fds)
            try:
                reply = self._replies.reply_to(message["seq"])
            except OSError:
                reply = None
            if reply is None:
                _reap(self._forget(), timeout=1)
                raise LauncherError("the minictr launcher died while answering; "
                                    "the next call starts a new one")
            return reply

    def _ensure_started(self) -> None:
        if self._socket is None or self._process is None or self._process.poll() is not None:
            self._restart()

    def _restart(self) -> None:
        _reap(self._forget(), timeout=1)
        self._start()

    def close(self) -> None:
        """End of the socket tells the launcher to kill what still runs and exit."""
        with self._lock:
            process = self._forget()
        _reap(process, timeout=10)

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-S", "-c", _BOOT, _PACKAGE_PARENT, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=_launcher_stderr(), start_new_session=True,
                env=_launcher_env())
        except OSError as error:
            ours.close()
            raise LauncherError(f"cannot start the minictr launcher: {error}") from error
        finally:
            theirs.close()
        self._socket = ours
        self._replies = protocol.ReplyReader(ours)

    def _forget(self) -> subprocess.Popen | None:
        if self._socket is not None:
            self._socket.close()
        process, self._socket, self._process = self._process, None, None
        self._replies = None
        return process


def _reap(process: subprocess.Popen | None, timeout: float) -> None:
    """Wait for a launcher whose socket we closed; one that hangs is killed (its containers
    die with it through PR_SET_PDEATHSIG)."""
    if process is None:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _launcher_stderr() -> int | None:
    """The launcher's stderr (its own tracebacks) is the caller's only with MINICTR_DEBUG=1:
    whatever fd 2 is, a container's init would inherit it, and the caller's stderr (a log
    file, a terminal) must be nothing a container can reach."""
    return None if os.environ.get("MINICTR_DEBUG") == "1" else subprocess.DEVNULL


def _launcher_env() -> dict[str, str]:
    # The launcher needs nothing from the caller's environment but which setup path to take
    # (see native); containers get their own.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    if native.SWITCH in os.environ:
        env[native.SWITCH] = os.environ[native.SWITCH]
    return env

