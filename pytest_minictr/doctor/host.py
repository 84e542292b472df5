"""What `minictr doctor` reads and tries of the host, all through one `Host`, which tests
replace with a simulated one (the isolation itself is never faked: the real rehearsal runs on
the real kernel, in its own process: `doctor.rehearsal`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pytest_minictr import native
from pytest_minictr.errors import MinictrError

REHEARSAL_TIMEOUT = 30  # seconds: a hung mount must not hang doctor


@dataclass(frozen=True)
class Rehearsal:
    """How the rehearsed container setup went: the failed step and its error, if any."""

    failed_step: str | None = None
    error: str = ""

    def reached(self, step: str, order: tuple[str, ...]) -> bool:
        """Whether `step` ran and passed."""
        if self.failed_step is None:
            return True
        return order.index(step) < order.index(self.failed_step)


# In the order of the container's setup plan (see container.plan), which the rehearsal follows.
REHEARSAL_STEPS = ("user namespace", "mount namespace", "/proc", "overlayfs", "pivot_root",
                   "seccomp")


class Host:
    """The real host. A test passes a subclass that answers differently."""

    def euid(self) -> int:
        return os.geteuid()

    def user(self) -> str:
        import pwd
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return str(os.geteuid())

    def setup_path(self) -> native.Choice:
        return native.setup_path()

    def kernel(self) -> str:
        return platform.release()

    def environ(self, name: str) -> str | None:
        return os.environ.get(name)

    def machine(self) -> str:
        return platform.machine()

    def read(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    def which(self, name: str) -> str | None:
        return shutil.which(name)

    def cache_dir(self) -> Path:
        from pytest_minictr.rootfs.builder import default_cache_dir
        return default_cache_dir()

    def writable(self, path: Path) -> bool:
        """`path` exists and we may write there, or it could be made (nearest parent)."""
        while not path.exists():
            path = path.parent
        return os.access(path, os.W_OK | os.X_OK)

    def cgroups(self) -> tuple[str | None, str]:
        """(backend name, problem) of the cgroups; the name None when there are none."""
        from pytest_minictr.host import cgroups
        from pytest_minictr.spec import Limits
        from pytest_minictr.validate import MIN_MEMORY
        try:
            backend = cgroups.detect(prepare=False)
        except MinictrError as problem:
            return None, str(problem)
        try:
            backend.check_limits(Limits(memory=MIN_MEMORY, cpus=1.0, pids=1))
        except MinictrError as problem:
            return backend.name, str(problem)
        return backend.name, ""

    def rehearse(self) -> Rehearsal:
        return rehearse()


def rehearse() -> Rehearsal:
    """Run the rehearsal in a fresh interpreter; its outcome."""
    try:
        done = subprocess.run([sys.executable, "-m", "pytest_minictr.doctor.rehearsal"],
                              capture_output=True, text=True, timeout=REHEARSAL_TIMEOUT)
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        return Rehearsal("user namespace", f"the rehearsal did not report ({error})")
    if outcome.get("failed"):
        return Rehearsal(outcome["failed"], outcome.get("error", ""))
    return Rehearsal()
