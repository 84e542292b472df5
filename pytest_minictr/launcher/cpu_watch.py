"""A container's CPU-time limit, kept by the launcher: it reads the CPU time its cgroup used
(the kernel's count of every process in it, the exited ones included) and kills the whole
container once that reaches `cpu_time_limit`.

The kernel offers no CPU-time limit for a group (cpu.max throttles, it never kills), and
RLIMIT_CPU counts one process at a time, in whole seconds: a program that forks gets its
budget once per child. So the launcher polls, and polls as seldom as it can: a group cannot
use more CPU per second of wall time than it has CPUs, so the limit cannot be reached before
`(limit - used) / cpus` seconds; the next look is then, and never sooner than `MIN_POLL`.
A busy container is looked at some ten times in all, and the last looks are MIN_POLL apart,
so it ends at most `cpus * MIN_POLL` (plus the kill's own latency) past its limit. A sleeping
one is looked at every `limit / cpus` seconds, and its wall timeout ends it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pytest_minictr.host.cgroups import Cgroup

MIN_POLL = 0.005  # seconds: at 2 CPUs, 10 ms of CPU past the limit at most (and 200 looks/s)


@dataclass
class CpuWatch:
    """The limit of one container, and when to look again. `base`: what its group had used
    before the command started (a spare's set-up, ours), which the limit does not count."""

    cgroup: Cgroup
    limit: float                  # seconds of CPU
    base: float
    cpus: float                   # the most CPUs the group can use at once
    check_at: float | None        # time.monotonic() of the next look; None: no more looks

    @classmethod
    def start(cls, cgroup: Cgroup, limit: float, cpus_limit: float | None,
              now: float) -> CpuWatch:
        usage = cgroup.cpu_usage()
        if usage is None:  # the starter refused a limit on a host whose groups cannot count
            raise RuntimeError(f"cgroup {cgroup.name} does not count its CPU time")
        cpus = float(len(os.sched_getaffinity(0)))
        return cls(cgroup, limit, usage, min(cpus, cpus_limit or cpus), now)

    def used(self) -> float:
        """CPU seconds the command (and all it started) used so far."""
        return self.since_start(self.cgroup.cpu_usage())

    def since_start(self, usage: float | None) -> float:
        """Of the group's count `usage` (read by the caller), what the command used."""
        return (usage or self.base) - self.base

    def exceeded(self, now: float) -> bool:
        """Look now: True once the limit is reached; else the next look is set."""
        remaining = self.limit - self.used()
        if remaining <= 0:
            self.check_at = None
            return True
        self.check_at = now + max(MIN_POLL, remaining / self.cpus)
        return False
