"""A container's life in the launcher: one `Life` value per container, moved on only by
`NEXT_LIFE`, and the record the launcher keeps of it (`Container`) while it runs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pytest_minictr.host.cgroups import Cgroup
from pytest_minictr.launcher.cpu_watch import CpuWatch
from pytest_minictr.protocol import EndReport


class Life(enum.Enum):
    """Where a container is between its command's start and its end told to the caller."""

    RUNNING = "running"                # nobody has asked it to end
    STOPPING = "stopping"              # stop() sent SIGTERM: however it ends, stop ended it
    KILLED_AT_STOP = "killed at stop"  # stop() (without grace, or after it) sent SIGKILL
    TIMED_OUT = "timed out"            # its time limit ran out: we sent SIGKILL
    OUT_OF_CPU = "out of CPU time"     # its cgroup used its cpu_time_limit: we sent SIGKILL
    ENDED = "ended"                    # its end is told; our child is still to be reaped


class Happening(enum.Enum):
    STOP_ASKED = "stop asked"          # with a grace period: SIGTERM first
    KILL_ASKED = "kill asked"          # stop without grace
    TIME_UP = "time up"
    CPU_TIME_UP = "CPU time up"
    END_TOLD = "end told"              # the event went to the caller


# Every move of a container's life, in one place. What is not listed leaves the life as it
# is: a second stop, a stop after the time limit, a time limit after a kill.
NEXT_LIFE = {
    (Life.RUNNING, Happening.STOP_ASKED): Life.STOPPING,
    (Life.RUNNING, Happening.KILL_ASKED): Life.KILLED_AT_STOP,
    (Life.STOPPING, Happening.KILL_ASKED): Life.KILLED_AT_STOP,
    (Life.RUNNING, Happening.TIME_UP): Life.TIMED_OUT,
    (Life.STOPPING, Happening.TIME_UP): Life.KILLED_AT_STOP,  # stop came first: it ended it
    (Life.RUNNING, Happening.CPU_TIME_UP): Life.OUT_OF_CPU,
    (Life.STOPPING, Happening.CPU_TIME_UP): Life.KILLED_AT_STOP,
    **{(life, Happening.END_TOLD): Life.ENDED for life in Life},
}

# How the caller is told a container ended, by the life it ended in.
ENDED_BY = {Life.RUNNING: None, Life.STOPPING: "stop", Life.KILLED_AT_STOP: "stop",
             Life.TIMED_OUT: "timeout", Life.OUT_OF_CPU: "cpu_time"}
# SIGKILL cannot be caught: after one of ours, a status >= 0 means the command exited by itself
# just before (a stop racing the natural end), and that is how it is told.
WE_KILLED = {Life.KILLED_AT_STOP, Life.TIMED_OUT, Life.OUT_OF_CPU}


@dataclass
class Container:
    """One container (or exec), from its command's start until our child (init, keeper or exec
    helper) is reaped."""

    id: str
    pid: int                          # our child: the init, or the keeper above it
    pidfd: int
    init_pidfd: int | None
    status_pipe: int | None
    events: int
    started: float
    timeout_at: float | None
    cgroup: Cgroup
    exec_of: str | None = None        # for an exec: the id of the container it runs in
    command_group: int | None = None  # for an exec: its command's process group (ends.kill_all)
    stop_signal: int = 15             # stop() sends it first (SIGTERM, or the image's)
    life: Life = Life.RUNNING
    kill_at: float | None = None      # after stop()'s grace period
    cpu_watch: CpuWatch | None = None  # its cpu_time_limit (not an exec's: the group is shared)
    held: tuple[int, ...] = ()        # locks on its image's layers (see `layer_holds`)
    report: EndReport = EndReport()   # what the init (and keeper) reported so far
    partial_line: bytes = field(default=b"", repr=False)  # a report line cut by a read

    def advance(self, happening: Happening) -> Life:
        """Move on to the life after `happening`; returns the life it was in."""
        before = self.life
        self.life = NEXT_LIFE.get((before, happening), before)
        return before

    @property
    def ended(self) -> bool:
        return self.life is Life.ENDED

    def take_status(self, chunk: bytes) -> None:
        """Parse the complete report lines of what the status pipe gave (b"": its end)."""
        *lines, self.partial_line = (self.partial_line + chunk).split(b"\n")
        if not chunk:
            lines.append(self.partial_line)  # a last line without its newline
            self.partial_line = b""
        for line in lines:
            self.report = self.report.adding(line)
