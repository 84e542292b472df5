"""The backend of a host that gives us no cgroups: containers run, unlimited and unmeasured.

As crun does, the lack of cgroups is a backend like the others rather than a None that every
caller must test: its groups join, kill and remove nothing and measure nothing, and any limit
is refused with the reason this host has no cgroups (and so the fix).
"""

from __future__ import annotations

from pytest_minictr.errors import UnsupportedError
from pytest_minictr.spec import Limits

from .base import Cgroup, CgroupBackend, CgroupStats
from .reaping import FOREIGN_GRACE


class NullBackend(CgroupBackend):
    name = "none"
    problem: str

    def __init__(self, problem: str):
        super().__init__(())
        self.problem = problem

    def __repr__(self) -> str:
        return f"<NullBackend: {self.problem}>"

    def check_limits(self, limits: Limits) -> None:
        if limits.any():
            raise UnsupportedError(f"resource limits need cgroups: {self.problem}")

    def cpu_usage_problem(self) -> str | None:
        return self.problem

    def create(self, name: str, limits: Limits) -> NullCgroup:
        self.check_limits(limits)
        return self.open(name)

    def open(self, name: str) -> NullCgroup:
        return NullCgroup(name, self.problem)

    def reap_stale(self, grace: float = FOREIGN_GRACE) -> list[str]:
        return []  # without cgroups no launcher left any behind


class NullCgroup(Cgroup):
    """No group at all: the container's processes stay in the launcher's cgroup. Killing the
    container then rests on its PID namespace alone (the kernel kills it with its init)."""

    def __init__(self, name: str = "", problem: str = "no cgroup"):
        super().__init__(name, ())
        self.problem = problem

    def join(self, pid: int) -> None:
        pass

    def apply_limits(self, limits: Limits) -> None:
        if limits.any():  # (check_limits() refused them already; a limit is never dropped)
            raise UnsupportedError(f"resource limits need cgroups: {self.problem}")

    def stats(self) -> CgroupStats:
        return CgroupStats(oom_killed=None)  # nothing measured, not even that

    def processes(self) -> set[int]:
        return set()

    def _kill_round(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def remove(self) -> None:
        pass
