"""Watching a running container from the caller: feed its stdin, drain its stdout and stderr,
and hear its end from the launcher.

One `Monitor` per container, pumped by whoever waits for it (no thread of our own). Both
streams are read as they come, so a container that fills one pipe while we wait on the other
never deadlocks; what lies beyond `output_limit` is read and dropped, so a flood neither blocks
the container nor grows the caller's memory (or, `kill_on_output_limit`, ends it at once).
"""

from __future__ import annotations

import errno
import json
import os
import select
import time
from collections.abc import Callable

_CHUNK = 1 << 16


class Monitor:
    def __init__(self, stdin: int | None, input_data: bytes | None, stdout: int | None,
                 stderr: int | None, events: int, output_limit: int):
        self._poll = select.poll()
        self._input = memoryview(input_data or b"")
        self._stdin = stdin
        self._outputs: dict[int, list[bytes]] = {}
        self._kept: dict[int, int] = {}
        self._events = events
        self._event_data = b""
        self._limit = output_limit
        self.truncated = False
        self.on_overflow: Callable[[], None] | None = None  # called once, at the first cut
        self.finished = False
        self._open: set[int] = set()
        for fd in (stdout, stderr):
            if fd is not None:
                self._outputs[fd], self._kept[fd] = [], 0
                self._watch(fd, select.POLLIN)
        self._stdout, self._stderr = stdout, stderr
        self._watch(events, select.POLLIN)
        if stdin is not None:
            os.set_blocking(stdin, False)
            self._watch(stdin, select.POLLOUT)

    def pump(self, deadline: float | None, once: bool = False) -> bool:
        """Move data until the container has ended (True) or `deadline` passes (False);
        `once`: or until something was read (a readiness wait looks at each new line)."""
        while self._open - ({self._stdin} if self._stdin is not None else set()):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._poll.poll(None if timeout is None else timeout * 1000)
            if deadline is not None and (not ready or time.monotonic() >= deadline):
                self._handle(ready)  # what is ready now is taken; a flood cannot hold us
                return False
            self._handle(ready)
            if once and self._open:
                return False
        self.finished = True
        self.close()
        return True

    def _handle(self, ready: list[tuple[int, int]]) -> None:
        for fd, _mask in ready:
            if fd == self._stdin:
                self._feed_stdin()
            elif fd == self._events:
                self._read_event()
            else:
                self._read_output(fd)

    @property
    def stdout(self) -> bytes:
        return b"" if self._stdout is None else b"".join(self._outputs[self._stdout])

    @property
    def stderr(self) -> bytes:
        return b"" if self._stderr is None else b"".join(self._outputs[self._stderr])

    @property
    def event(self) -> dict | None:
        """The launcher's report of the container's end; None if the launcher died first."""
        return json.loads(self._event_data) if self._event_data.strip() else None

    def close(self) -> None:
        for fd in list(self._open):
            self._unwatch(fd)

    def __del__(self) -> None:
        # a Container dropped unread: our pipe ends go, so the command sees EPIPE, not a hang
        self.close()

    def _watch(self, fd: int, events: int) -> None:
        self._poll.register(fd, events)
        self._open.add(fd)

    def _unwatch(self, fd: int) -> None:
        self._poll.unregister(fd)
        self._open.discard(fd)
        os.close(fd)

    def _feed_stdin(self) -> None:
        assert self._stdin is not None  # only its fd is polled for POLLOUT
        try:
            written = os.write(self._stdin, self._input[:_CHUNK]) if self._input else 0
        except BlockingIOError:
            return
        except BrokenPipeError:
            # the command stopped reading: drop the rest, as subprocess does
            written = len(self._input)
        self._input = self._input[written:]
        if not self._input:
            self._unwatch(self._stdin)

    def _read_event(self) -> None:
        chunk = os.read(self._events, _CHUNK)
        if chunk:
            self._event_data += chunk
        else:
            self._unwatch(self._events)

    def _read_output(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError as error:
            if error.errno != errno.EAGAIN:
                raise
            return
        if not chunk:
            self._unwatch(fd)
            return
        room = self._limit - self._kept[fd]
        if len(chunk) > room:
            if not self.truncated and self.on_overflow is not None:
                self.on_overflow()
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        if chunk:
            self._outputs[fd].append(chunk)
            self._kept[fd] += len(chunk)
