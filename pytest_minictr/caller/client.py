"""The caller's side of the launcher: start it once, send it requests, start a new one if it died.

The caller (pytest, a CLI, a grader) never forks a container itself; see `launcher.server`.
Every request goes through `LauncherClient.call()` (the requests: `protocol.REQUESTS`).
Requests may come from several threads: one lock serialises each request with its reply.
A request whose reply is not needed at once may be `sent` ahead: its reply is kept when it
comes, to be read with `Pending.reply()`.
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
from dataclasses import dataclass
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
        # requests sent ahead (see send): their replies, once read, wait in _held
        self._pending: set[int] = set()
        self._held: dict[int, dict[str, Any]] = {}

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

    def send(self, op: str, *, fds: Sequence[int] = (), **fields: Any) -> Pending:
        """Send the request `op` now and read its reply later (`Pending.reply()`): the
        launcher answers it meanwhile, while the caller goes on."""
        with self._lock:
            seq = self._send({"op": op, **fields}, fds)
            self._pending.add(seq)
        return Pending(self, seq)

    def _exchange(self, message: dict[str, Any], fds: Sequence[int]) -> dict[str, Any]:
        """One request sent, its reply (whatever it says) returned."""
        with self._lock:
            return self._reply_to(self._send(message, fds))

    def _send(self, message: dict[str, Any], fds: Sequence[int]) -> int:
        """(Under the lock.) The request sent; its seq."""
        self._ensure_started()
        assert self._socket is not None  # _ensure_started made it
        seq = next(self._seq)
        message = {**message, "seq": seq}
        try:
            protocol.send_message(self._socket, message, fds)
        except OSError as error:
            if error.errno not in _GONE:
                raise
            # It died since we last looked; the request never reached it, so resend once.
            self._restart()
            protocol.send_message(self._socket, message, fds)
        return seq

    def _reply_to(self, seq: int) -> dict[str, Any]:
        """(Under the lock.) The reply to `seq`; those to requests sent ahead are kept on the
        way, any other is skipped (its caller was interrupted)."""
        assert self._replies is not None
        try:
            while True:
                reply = self._replies.next_reply()
                if reply is None or reply.get("seq") == seq:
                    break
                if reply.get("seq") in self._pending:
                    self._held[reply["seq"]] = reply
        except OSError:
            reply = None
        if reply is None:
            _reap(self._forget(), timeout=1)
            raise LauncherError("the minictr launcher died while answering; "
                                "the next call starts a new one")
        return reply

    def _take_reply(self, seq: int) -> dict[str, Any] | None:
        """A reply to a request sent ahead; None if its launcher is gone (it never came)."""
        with self._lock:
            if seq in self._held:
                self._pending.discard(seq)
                return self._held.pop(seq)
            if seq not in self._pending:
                return None
            try:
                return self._reply_to(seq)
            except LauncherError:
                return None
            finally:
                self._pending.discard(seq)

    def _drop_reply(self, seq: int) -> None:
        """A reply to a request sent ahead that no one will read: skipped when it comes."""
        with self._lock:
            self._pending.discard(seq)
            self._held.pop(seq, None)

    def start(self) -> None:
        """Start the launcher now if none runs, without waiting for it: it readies itself
        (its imports, zygote and spares) while the caller goes on."""
        with self._lock:
            self._ensure_started()

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
        self._pending.clear()  # their replies will not come: Pending.reply() says so
        self._held.clear()
        return process


@dataclass(frozen=True)
class Pending:
    """A request sent ahead (`LauncherClient.send`), its reply not read yet."""

    client: LauncherClient
    seq: int

    def reply(self) -> dict[str, Any] | None:
        """The reply (an error it says raised as in `call`); None if the launcher that had
        the request is gone: it may never have been carried out."""
        reply = self.client._take_reply(self.seq)
        if reply is not None and not reply["ok"]:
            raise protocol.error_of(reply["error"])
        return reply

    def drop(self) -> None:
        """No one will read the reply."""
        self.client._drop_reply(self.seq)


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

