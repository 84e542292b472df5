"""The pipes of a container started from the caller: its stdin, stdout, stderr and the
launcher's event pipe. The child's ends travel to the launcher; ours feed the `Monitor`."""

from __future__ import annotations

import os
from typing import Any

from pytest_minictr.errors import ConfigError, MinictrError


class Pipes:
    """The container's stdio and event pipes. The child's ends go to the launcher and are
    closed here at once (else we would never see end of file); ours go to the Monitor."""

    def __init__(self, input_data: bytes | None, stdin: Any, stdout: Any, stderr: Any):
        self._ours: list[int] = []
        self._theirs: list[int] = []
        try:
            self.stdin = self._source(stdin, input_data)
            self.stdout = self._sink(stdout)
            self.stderr = self._sink(stderr)
            self.events, events_w = self._pipe()
            self._ours.append(self.events)
            self._theirs.append(events_w)
            self._child = [self.stdin[0], self.stdout[1], self.stderr[1], events_w]
        except BaseException:
            self.__exit__()
            raise

    def _pipe(self) -> tuple[int, int]:
        try:
            return os.pipe2(os.O_CLOEXEC)
        except OSError as error:  # EMFILE: containers left running unread hold their pipes
            raise MinictrError(f"cannot make a pipe for the container: {error.strerror} "
                               "(wait() for finished containers, or raise `ulimit -n`)") from None

    def _source(self, stdin: Any, input_data: bytes | None) -> tuple[int, int | None]:
        if input_data is not None:
            read_end, write_end = self._pipe()
            self._theirs.append(read_end)
            self._ours.append(write_end)
            return read_end, write_end
        if stdin is None:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            self._theirs.append(fd)
            return fd, None
        return _fileno(stdin, "stdin"), None

    def _sink(self, target: Any) -> tuple[int | None, int]:
        if target is None:
            read_end, write_end = self._pipe()
            self._ours.append(read_end)
            self._theirs.append(write_end)
            return read_end, write_end
        return None, _fileno(target, "stdout/stderr")

    def child_fds(self) -> list[int]:
        return self._child

    def take_parent_fds(self, input_data: bytes | None
                        ) -> tuple[int | None, bytes | None, int | None, int | None, int]:
        """Our ends, now owned by the Monitor: stdin, input, stdout, stderr, events."""
        self._ours = []
        return self.stdin[1], input_data, self.stdout[0], self.stderr[0], self.events

    def __enter__(self) -> Pipes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fd in self._theirs + self._ours:
            os.close(fd)
        self._theirs, self._ours = [], []


def _fileno(target: Any, name: str) -> int:
    """The open descriptor behind `target` (an int, or a file with a real fileno())."""
    try:
        fd = target if isinstance(target, int) and not isinstance(target, bool) \
            else target.fileno()
        os.fstat(fd)
    except (AttributeError, ValueError, OSError, TypeError, OverflowError) as error:
        # io.UnsupportedOperation is a ValueError; a number past C int range, OverflowError
        raise ConfigError(f"{name}={target!r}: expected an open file or file descriptor "
                          f"({error})") from None
    return fd
