"""Which path carries out a container's setup plan: the native core (`minictr-init`, a small C
program built with the package where a compiler was there: see setup.py), or pure Python.

With the native core, no Python runs inside a container: its PID 1 is `minictr-init`, run
from a sealed in-memory copy (see launcher.native). Without it (no compiler when the package
was installed, or MINICTR_NATIVE=0), the launcher forks Python inits, which carry out the
same plan with container.executor: every behaviour is the same, each start costs more.
`minictr doctor`, `minictr --version` and the pytest report header say which path runs.
"""

from __future__ import annotations

import functools
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


def setup_path(program: str = PROGRAM) -> Choice:
    """The path containers take from a launcher started with this environment."""
    if os.environ.get(SWITCH, "1") == "0":
        return Choice(SetupPath.PYTHON, f"{SWITCH}=0")
    if not os.access(program, os.X_OK):
        return Choice(SetupPath.PYTHON, "the native core was not built (no C compiler at "
                                        "install time): install a wheel to get it")
    problem = why_it_cannot_run(program)
    if problem:
        return Choice(SetupPath.PYTHON, f"the native core cannot run on this host ({problem}): "
                                        f"reinstall the package here")
    return Choice(SetupPath.NATIVE, "minictr-init, no Python inside containers")


@functools.cache
def why_it_cannot_run(program: str) -> str | None:
    """The loader's complaint if `program` does not run here, else None. A program built on
    a newer C library than the host's (a checkout shared with a newer userland, a venv copied
    between machines) is refused by the dynamic loader: a zygote that died at every start
    would cost a restart per container, so the launcher never tries it (one spawn, once per
    process)."""
    reader, writer = os.pipe()
    try:
        # posix_spawn (vfork-style): a fraction of subprocess.run's cost (docs/performance.md)
        pid = os.posix_spawn(program, [program, "actions"], {}, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, writer, 2)])
    except OSError as error:
        os.close(reader)
        return str(error)
    finally:
        os.close(writer)
    with os.fdopen(reader, "rb") as errors:
        complaint = errors.read(4096)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status == 0:
        return None
    lines = complaint.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {status}"


def native_program() -> str | None:
    """The native core's program, if containers are to use it."""
    return PROGRAM if setup_path().path is SetupPath.NATIVE else None
