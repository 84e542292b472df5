"""The caller's side of a sandboxed test body's cgroup: asked of the launcher before the fork,
watched by it after, its end (and what the kernel measured) read back here. See
`launcher.sandboxes`; the fork itself is `plugin.sandbox`'s."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from dataclasses import dataclass

from pytest_minictr import protocol
from pytest_minictr.caller.client import LauncherClient, Pending
from pytest_minictr.errors import LauncherError, MinictrError
from pytest_minictr.spec import Limits

END_WAIT = 30.0  # seconds for the launcher's end event once our child is reaped


@dataclass(frozen=True)
class SandboxEnd:
    """How the body's cgroup ended, as the launcher saw it."""

    timed_out: bool = False
    oom_killed: bool = False
    memory_peak: int | None = None
    cpu_time: float | None = None
    pids_refused: int = 0
    lost: bool = False  # no event came (the launcher died): the figures are unknown


class SandboxOrder:
    """A sandbox asked of the launcher, its reply not read yet: read by `lease()`, at once
    for the body about to fork, or later for one asked ahead (see `ContainerRuntime`)."""

    def __init__(self, client: LauncherClient, sandbox_id: str, limits: Limits,
                 timeout: float | None, services: tuple[tuple[str, int], ...] = ()):
        self._client = client
        self.id = sandbox_id
        self.asked = (limits, timeout, services)
        events_r, events_w = os.pipe2(os.O_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) if services \
            else (None, None)
        try:
            self._pending = client.send(protocol.SANDBOX, fds=[events_w, *_fds(theirs)],
                                        id=sandbox_id, limits=vars(limits), timeout=timeout,
                                        services=[list(address) for address in services])
        except BaseException:
            os.close(events_r)
            if ours is not None:
                ours.close()
            raise
        finally:
            os.close(events_w)
            if theirs is not None:
                theirs.close()
        self._events = events_r
        self._relay = ours

    def lease(self) -> SandboxLease | None:
        """The sandbox, once the launcher made it (its error raised); None if the launcher
        went away before it answered."""
        try:
            reply = self._pending.reply()
        except BaseException:
            self._close()
            raise
        if reply is None:
            self._close()
            return None
        return SandboxLease(self._client, self.id, self._events, self._relay, reply)

    def cancel(self) -> None:
        """Not used: the launcher removes it (as if its body's fork had failed)."""
        self._pending.drop()
        self._close()
        with contextlib.suppress(OSError, MinictrError):
            self._client.send(protocol.WATCH, id=self.id, pid=None).drop()

    def forget(self) -> None:
        """Not used, and its launcher goes (and removes it) with the runtime."""
        self._pending.drop()
        self._close()

    def _close(self) -> None:
        os.close(self._events)
        if self._relay is not None:
            self._relay.close()


class SandboxLease:
    """One body's cgroup: `cgroup_procs` to join, `watch(pid)` once forked, `end()` after.
    With `services`, `relay` is the body's socket to the launcher's relay (see
    `container.network`); what the relay could not reach is read back with `relay_told()`."""

    def __init__(self, client: LauncherClient, sandbox_id: str, events: int,
                 relay: socket.socket | None, reply: dict):
        self._client = client
        self.id = sandbox_id
        self._events = events
        self._relay = relay
        self.relay: int | None = None if relay is None else relay.fileno()
        self.cgroup_procs: tuple[str, ...] = tuple(reply["cgroup_procs"])
        self.init_pid: int | None = reply["init_pid"]  # as root: the spare init to join
        self._watch: Pending | None = None

    def watch(self, pid: int | None) -> None:
        """From now on the launcher watches `pid` (None: the fork failed; the group goes).
        Its reply is read by `watched()`, before `pid` is reaped (as `end()` does)."""
        self._watch = self._client.send(protocol.WATCH, id=self.id, pid=pid)

    def watched(self) -> None:
        """The launcher's reply to `watch`: its error raised, or LauncherError if the
        launcher went away before it answered. Read before the watched child is reaped: its
        pid, once free, could be another process's by the time the launcher looks it up."""
        pending, self._watch = self._watch, None
        if pending is not None and pending.reply() is None:
            raise LauncherError("the minictr launcher died while answering; "
                                "the next call starts a new one")

    def abandon(self) -> None:
        """The body killed (Ctrl-C, a timeout of the caller's): nothing more is read, but
        the launcher's reply to `watch`, whatever it says (see `watched`)."""
        with contextlib.suppress(MinictrError):
            self.watched()
        self.end(wait=False)

    def relay_told(self) -> list[dict]:
        """What the relay told of the body's connections (once the body has ended: each
        line was sent before the body could see the refusal it tells of), and its end."""
        if self._relay is None:
            return []
        self._relay.setblocking(False)
        data = b""
        try:
            while chunk := self._relay.recv(65536):
                data += chunk
        except BlockingIOError:
            pass
        finally:
            self._relay.close()
            self._relay = None
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def end(self, wait: bool = True) -> SandboxEnd:
        """The figures; or, not `wait`ing, none (the launcher still cleans up after the body:
        a caller that needs no figures need not wait for that)."""
        try:
            self.watched()
            if not wait:
                return SandboxEnd()
            if not select.select([self._events], [], [], END_WAIT)[0]:
                return SandboxEnd(lost=True)
            line = os.read(self._events, 65536)
        finally:
            os.close(self._events)
            if self._relay is not None:
                self._relay.close()
        return SandboxEnd(**json.loads(line)) if line else SandboxEnd(lost=True)


def _fds(sock: socket.socket | None) -> list[int]:
    return [] if sock is None else [sock.fileno()]
