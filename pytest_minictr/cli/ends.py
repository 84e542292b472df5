"""How a container's end reads on the command line, as Docker users expect it: the exit
status (the command's own; 128+N after signal N; 125, 126, 127 for minictr's failures), and one
stderr line for every end the user did not ask for (OOM kill, timeouts, kill by a signal).
A reader of our output that went away (`minictr ps | head -1`) is an end the user asked for:
no line, no traceback, and the status of a program killed by SIGPIPE (141), as Docker's."""

from __future__ import annotations

import os
import select
import signal
import stat
import sys
from collections.abc import Mapping
from typing import Any

EXIT_RUNTIME_ERROR = 125   # minictr itself failed (usage errors included), as `docker run`
EXIT_CANNOT_EXECUTE = 126  # the command is there but cannot be executed
EXIT_NOT_FOUND = 127       # the command is not there


def exit_status(returncode: int) -> int:
    """A Result's returncode (negative: killed by that signal) as a shell's exit status."""
    return returncode if returncode >= 0 else 128 - returncode


def shown_status(status: str, returncode: int | None) -> str:
    """`ps`'s STATUS column: 'exited (137)', 'timed_out (137)', 'running'."""
    return status if returncode is None else f"{status} ({exit_status(returncode)})"


def end_line(report: Mapping[str, Any], memory_limit: int | None, timeout: float | None,
             asked: bool = False) -> str | None:
    """The line for an end the user did not ask for (`report`: Result.to_dict()); None for
    an ordinary exit, or for a signal the user sent (`asked`: Ctrl-C, `minictr stop`)."""
    if report.get("cpu_time_exceeded"):
        return f"minictr: out of CPU time after {report.get('cpu_time') or 0:.2f} s (killed)"
    if report.get("timed_out"):
        return f"minictr: timed out after {timeout:g} s (killed)"
    if report.get("oom_killed"):
        return (f"minictr: killed by the OOM killer: memory limit {_mib(memory_limit)}, "
                f"peak {_mib(report.get('memory_peak'))}")
    returncode = report.get("returncode", 0)
    if returncode < 0 and not asked:
        return f"minictr: the command was killed by {_signal_name(-returncode)}"
    return None


def print_end_line(report: Mapping[str, Any], memory_limit: int | None,
                   timeout: float | None, asked: bool = False) -> None:
    # the command wrote into our stdout (or stderr) after its reader had gone (`| head -1`)
    asked = asked or (report.get("returncode") == -signal.SIGPIPE
                      and any(map(_reader_gone, (1, 2))))
    line = end_line(report, memory_limit, timeout, asked)
    if line:
        print(line, file=sys.stderr)


def reader_went_away() -> int:
    """After a write of ours failed with EPIPE: end as a program killed by SIGPIPE would (Python
    ignores the signal, so the write raised instead), quietly; and with nothing of ours left
    to flush into the dead pipe at exit, which would print 'Exception ignored' there."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if _reader_gone(fd):
            os.dup2(null, fd)
    os.close(null)
    return exit_status(-signal.SIGPIPE)


def _reader_gone(fd: int) -> bool:
    """`fd` is the writing end of a pipe whose every reader has closed it (the kernel reports
    POLLERR on such an end)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
    except OSError:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**20:.1f}M"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
