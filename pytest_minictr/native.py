"""Which path carries out a container's setup plan: the native core (`minictr-init`, a small C
program built with the package where a compiler was there: see setup.py), or pure Python.

With the native core, no Python runs inside a container: its PID 1 is `minictr-init`, run
from a sealed in-memory copy (see launcher.native). Without it (no compiler when the package
was installed, or MINICTR_NATIVE=0), the launcher forks Python inits, which carry out the
same plan with container.executor: every behaviour is the same, each start costs more.
`minictr doctor`, `minictr --version` and the pytest report header say which path runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

PROGRAM = os.path.join(os.path.dirname(__file__), "container", "native", "minictr-init")
SWITCH = "MINICTR_NATIVE"  # "0": the pure Python path, even with the native core built


class SetupPath(Enum):
    NATIVE = "native"
    PYTHON = "python"


@dataclass(frozen=True)
class Choice:
    """The path a launcher started now would take, and why."""

    path: SetupPath
    reason: str

    def __str__(self) -> str:
        return f"{self.path.value} ({self.reason})"


def native_path() -> Choice:
    """The path containers take from a launcher started with this environment."""
    if os.environ.get(SWITCH, "1") == "0":
        return Choice(SetupPath.PYTHON, f"{SWITCH}=0")
    if not os.access(PROGRAM, os.X_OK):
        return Choice(SetupPath.PYTHON, "the native core was not built (no C compiler at "
                                        "install time): install a wheel to get it")
    return Choice(SetupPath.NATIVE, "minictr-init, no Python inside containers")


def native_program() -> str | None:
    """The native core's program, if containers are to use it."""
    return PROGRAM if native_path().path is SetupPath.NATIVE else None
