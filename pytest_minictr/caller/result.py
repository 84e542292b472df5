"""What a container did and what it measures: the `Result` (shaped like
`subprocess.CompletedProcess`), the figures of a running one (`ContainerStats`), its status,
and the two errors that are also subprocess's."""

from __future__ import annotations

import enum
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from pytest_minictr.errors import MinictrError
from pytest_minictr.spec import Limits

VERDICT_HEAD = 4096     # bytes of each stream in Result.to_dict()
STDERR_TAIL = 2048      # bytes of a container's stderr an error or a failed test's report shows
_SIGNAL_NUMBERS = {int(number) for number in signal.Signals}


class WaitTimeoutError(MinictrError, subprocess.TimeoutExpired):
    """`Container.wait(timeout=...)` gave up; the container is still running."""

    def __init__(self, cmd: Any, timeout: float):
        subprocess.TimeoutExpired.__init__(self, cmd, timeout)

    def __str__(self) -> str:
        return f"container {self.cmd!r} still running after waiting {self.timeout:g} s"


class ContainerProcessError(MinictrError, subprocess.CalledProcessError):
    """`Result.check_returncode()` on a non-zero exit; carries the output like subprocess."""

    def __init__(self, returncode: int, cmd: Any, output: bytes = b"", stderr: bytes = b""):
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)

    def __str__(self) -> str:
        return subprocess.CalledProcessError.__str__(self)


class ContainerStatus(str, enum.Enum):
    RUNNING = "running"
    EXITED = "exited"        # the command ended by itself (any exit code or signal)
    STOPPED = "stopped"      # ended by stop()
    TIMED_OUT = "timed_out"  # killed when its `timeout` (or `cpu_time_limit`) passed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Result:
    """What a container did, shaped like `subprocess.CompletedProcess`, plus what was measured.

    `returncode` is negative when the command was killed by a signal (-9: SIGKILL, as after a
    timeout). Kernel measurements are None where this host could not take them.
    """

    args: tuple[str, ...]
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    output_truncated: bool = False
    wall_time: float = 0.0
    cpu_time: float | None = None
    memory_peak: int | None = None
    oom_killed: bool | None = None
    container_id: str = ""
    cpu_time_exceeded: bool = False  # killed for its CPU time: cpu_time_limit or RLIMIT_CPU

    def check_returncode(self) -> None:
        """Raise ContainerProcessError (a subprocess.CalledProcessError) if returncode != 0."""
        if self.returncode:
            raise ContainerProcessError(self.returncode, list(self.args), self.stdout, self.stderr)

    @property
    def verdict(self) -> str:
        """One word for a grader, the first that holds: "output_limit" (output cut at
        output_limit: a flood, whatever ended it), "cpu_time" (killed for the CPU time it
        used), "timeout" (killed at its wall time limit), "memory" (the OOM killer struck),
        "signal" (killed by a signal), "runtime_error" (exit status not 0), "ok"."""
        if self.output_truncated:
            return "output_limit"
        if self.cpu_time_exceeded:
            return "cpu_time"
        if self.timed_out:
            return "timeout"
        if self.oom_killed:
            return "memory"
        if self.returncode < 0:
            return "signal"
        return "runtime_error" if self.returncode else "ok"

    def to_dict(self, head: int = VERDICT_HEAD) -> dict[str, Any]:
        """The Result as JSON-ready values: the verdict, the figures, and the first `head`
        bytes of stdout and stderr (decoded, undecodable bytes replaced)."""
        signum = -self.returncode if self.returncode < 0 else None
        return {
            "verdict": self.verdict, "returncode": self.returncode,
            "signal": signal.Signals(signum).name if signum in _SIGNAL_NUMBERS else signum,
            "wall_time": self.wall_time, "cpu_time": self.cpu_time,
            "memory_peak": self.memory_peak, "oom_killed": bool(self.oom_killed),
            "timed_out": self.timed_out, "output_truncated": self.output_truncated,
            "cpu_time_exceeded": self.cpu_time_exceeded,
            "stdout": self.stdout[:head].decode("utf-8", "replace"),
            "stderr": self.stderr[:head].decode("utf-8", "replace"),
            "stdout_bytes": len(self.stdout), "stderr_bytes": len(self.stderr),
            "args": list(self.args), "container_id": self.container_id}


@dataclass(frozen=True)
class ContainerStats:
    """A running container's figures now, from its cgroup (None where this host has none):
    cheap enough to poll."""

    memory_current: int | None      # bytes in use now (its tmpfs files included)
    memory_peak: int | None         # bytes, the most so far
    cpu_time: float | None          # CPU seconds so far, every process of it
    processes: int | None           # processes and threads of the command(s) alive now
    oom_killed: bool                # the OOM killer has struck in it
    limits: Limits                  # the limits in force


def tail(data: bytes, size: int = STDERR_TAIL) -> str:
    """The last `size` bytes of a stream, as text."""
    return data[-size:].decode(errors="replace")
