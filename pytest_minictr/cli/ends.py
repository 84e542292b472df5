"""How a container's end reads on the command line, as Docker users expect it: the exit
status (the command's own; 128+N after signal N; 125, 126, 127 for minictr's failures), and one
stderr line for every end the user did not ask for (OOM kill, timeout, kill by a signal)."""

from __future__ import annotations

import signal
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
    line = end_line(report, memory_limit, timeout, asked)
    if line:
        print(line, file=sys.stderr)


def size_text(size: int) -> str:
    """Bytes as `docker stats` shows them: 64M, 1.5G, 812K (binary units, one decimal)."""
    for unit, letter in ((2**30, "G"), (2**20, "M"), (2**10, "K")):
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + letter
    return f"{size}B"


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**20:.1f}M"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
