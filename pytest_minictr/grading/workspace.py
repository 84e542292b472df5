"""A job's directory on the host: its files and what its build made (`build`, bound
read-only at /build in each case), each case's working directory (`case_dir`, bound
read-write at /box), the checker's files and its three inputs.

It lives in a tmpfs (/dev/shm) when the host has one: pages a container writes there are
charged to that container's memory cgroup, so a case that writes without end is stopped by
its own memory limit (verdict `memory`) and never fills the host's disk.

The sandboxed processes run as container root, an unprivileged host uid we do not pick: the
directories they write are world-writable, inside a parent only root may enter. What they
leave is read back with O_NOFOLLOW at each step, so a symlink planted in a case directory
(`out.txt -> /etc/shadow`) is refused, never followed on the host.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

BUILD = "/build"    # the built files, read-only, in every case
BOX = "/box"        # the working directory: the build's (writable), or a case's
CHECKER = "/checker"
CHECK = "/check"    # the checker's input, output and answer
SHARED_MEMORY = "/dev/shm"
PREFIX = "minictr-job-"  # then the pid of the process that made it


def default_parent() -> str:
    if os.path.isdir(SHARED_MEMORY) and os.access(SHARED_MEMORY, os.W_OK | os.X_OK):
        return SHARED_MEMORY
    return tempfile.gettempdir()


class Workspace:
    """The directories of one job, removed on close (a context manager)."""

    def __init__(self, parent: str | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-",
                                          dir=parent or default_parent()))
        self.build = self._fresh_dir("build", 0o777)
        self.checker = self.path / "checker"

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def write_files(self, files: tuple[tuple[str, str], ...], into: Path | None = None) -> None:
        target = into or self.build
        target.mkdir(mode=0o755, exist_ok=True)
        for relative, text in files:
            path = target / relative
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            path.write_text(text)
            # executable too: a job may ship a script as its run command
            path.chmod(0o755)

    def case_dir(self) -> Path:
        """A fresh working directory for a case: a symlink to /build/NAME for each thing the
        build holds, so `./main` runs and files written land here, not in the build."""
        case = self._fresh_dir("case", 0o777)
        for entry in os.listdir(self.build):
            os.symlink(f"{BUILD}/{entry}", case / entry)
        return case

    def checker_inputs(self, stdin: bytes, output: bytes, answer: bytes) -> Path:
        check = self._fresh_dir("check", 0o755)
        for name, data in (("input", stdin), ("output", output), ("answer", answer)):
            (check / name).write_bytes(data)
            (check / name).chmod(0o644)
        return check

    def _fresh_dir(self, name: str, mode: int) -> Path:
        path = self.path / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        path.chmod(mode)  # (mkdir's mode passes through the umask)
        return path


def remove_workspaces_of(pid: int, parent: str | None = None) -> None:
    """What a process killed outright (SIGKILL: no cleanup of its own) left."""
    for path in Path(parent or default_parent()).glob(f"{PREFIX}{pid}-*"):
        shutil.rmtree(path, ignore_errors=True)


def read_inside(root: Path, relative: str, limit: int) -> bytes | None:
    """The first `limit` bytes of the regular file `relative` under `root`, or None where there
    is none, or where a step of the way is a symlink (the container made it: never followed)."""
    parts = relative.split("/")
    try:
        directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        # O_NONBLOCK: a FIFO planted there must not hang the grader
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError:
        os.close(directory)
        return None
    os.close(directory)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return file.read(limit)
