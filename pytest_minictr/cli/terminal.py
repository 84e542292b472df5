"""`-t`: a pseudo-terminal for the container's command, relayed to ours.

The pty is the container's: its init opens it in the container's own devpts instance (so the
command's `tty` and `ps` name it /dev/pts/N; see `container.init.open_terminal`) and sends the
master back on the console socket we gave as the container's stdio. The command gets the
slave as stdin, stdout and stderr (and as its controlling terminal); we copy our stdin to the
master and the master to our stdout. While it runs, our own terminal is raw: ^C, ^Z and ^\\
travel as bytes to the pty, whose line discipline signals the container's foreground group,
not us. Our window size is copied once the master comes and on each SIGWINCH (the kernel then
tells the container's foreground group). Our terminal's modes are put back on every way out:
return, exception, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

POLL = 0.05  # seconds between looks at whether the container has ended
CHUNK = 65536


class Terminal:
    """One pty for one command. `interactive` (-i): our stdin goes to it. `console`: the
    end of the console socket to give the container as its stdin, stdout and stderr."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket = ours
        self.console = theirs.detach()
        self.master = -1  # until the container sends it
        self.stdin = sys.stdin.fileno()
        self.stdout = sys.stdout.fileno()
        self.ours_is_a_tty = os.isatty(self.stdin)
        self._saved: list | None = None

    def close_console(self) -> None:
        """Once the container holds its end: ours would keep us waiting for a master that a
        container which failed to start never sends."""
        if self.console >= 0:
            os.close(self.console)
            self.console = -1

    def receive_master(self, ended: Callable[[], bool]) -> bool:
        """Wait for the pty's master from the container; False if it ended without one."""
        while not select.select([self._socket], [], [], POLL)[0]:
            if ended():
                return False
        _, fds, _, _ = socket.recv_fds(self._socket, 16, 1)
        if not fds:
            return False  # end of file: every holder of the console closed it
        self.master = fds[0]
        os.set_inheritable(self.master, False)
        self.copy_window_size()
        return True

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        """Our terminal raw and its size passed on, while the command runs; restored after."""
        previous = {}
        if self.ours_is_a_tty:
            self._saved = termios.tcgetattr(self.stdin)
            self.copy_window_size()
            previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH,
                                                      lambda *_: self.copy_window_size())
            if self.interactive:
                tty.setraw(self.stdin, termios.TCSANOW)
        try:
            yield
        finally:
            self.restore()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.stdin, termios.TCSAFLUSH, self._saved)

    def copy_window_size(self) -> None:
        if self.master < 0:
            return  # (receive_master copies it)
        try:
            size = fcntl.ioctl(self.stdin, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass  # our stdin is no terminal after all: the pty keeps its size

    def relay(self, ended: Callable[[], bool]) -> None:
        """Copy both ways until the command has ended and its last output is out."""
        if not self.receive_master(ended):
            return
        sources = [self.master] + ([self.stdin] if self.interactive else [])
        while sources:
            try:
                ready = select.select(sources, [], [], POLL)[0]
            except InterruptedError:
                continue
            if self.stdin in ready and not self._copy_stdin():
                sources.remove(self.stdin)
            if self.master in ready and not self._copy_output():
                sources.remove(self.master)
            if not ready and ended():
                return  # quiet, and over: what a leftover holder of the slave writes is lost

    def _copy_stdin(self) -> bool:
        data = os.read(self.stdin, CHUNK)
        if not data:  # our input ended: the pty's end-of-file character, as a typed ^D
            os.write(self.master, bytes([termios.tcgetattr(self.master)[6][termios.VEOF]]))
            return False
        os.write(self.master, data)
        return True

    def _copy_output(self) -> bool:
        try:
            data = os.read(self.master, CHUNK)
        except OSError as error:
            if error.errno == errno.EIO:  # every holder of the slave has closed it
                return False
            raise
        if not data:
            return False
        _write_all(self.stdout, data)
        return True

    def close(self) -> None:
        self.close_console()
        self._socket.close()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run_on_terminal(terminal: Terminal, wait: Callable[[], T]) -> T:
    """`wait` (the container's, blocking) in a thread while we relay in this one; its value.
    SIGTERM and SIGHUP restore our terminal on their way (their handlers are the caller's)."""
    outcome: dict = {}

    def waiter() -> None:
        try:
            outcome["value"] = wait()
        except BaseException as error:  # noqa: BLE001 - handed to the relaying thread
            outcome["error"] = error

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    with terminal.raw():
        terminal.relay(lambda: not thread.is_alive())
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
