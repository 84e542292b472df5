"""A process's /proc files, read in one place: /proc/PID/stat (its state, parent and start
time) and /proc/PID/ns (its namespaces, opened to be joined).

The second field of stat, the command name in parentheses, may itself hold spaces and ')' (a
process names itself with prctl(PR_SET_NAME)): the fields after it are found from the last ')'.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from pytest_minictr.host import linux


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat that we use (proc(5) numbers them from 1)."""

    state: str         # field 3: R, S, D, Z (zombie), X (dead), ...
    ppid: int          # field 4
    start_time: int    # field 22: clock ticks after boot; with the pid, names one process

    @property
    def has_exited(self) -> bool:
        """A zombie waits only for its parent to reap it: it runs no more."""
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat fields, or None if no process has that pid (or it is not ours to see)."""
    try:
        text = linux.read_file(f"/proc/{pid}/stat")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return ProcStat(state=fields[0], ppid=int(fields[1]), start_time=int(fields[19]))


def open_namespaces(pid: int, names: Iterable[str]) -> dict[str, int]:
    """fds of `pid`'s namespaces by name ('user', 'net', 'pid'...), to setns(2) into. On an
    OSError (most likely: the process has ended) those opened already are closed first."""
    fds: dict[str, int] = {}
    try:
        for name in names:
            fds[name] = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def shares_namespace(pid: int, name: str) -> bool:
    """Whether `pid` is in our own namespace `name` (nsfs tells a namespace by its inode)."""
    return os.stat(f"/proc/{pid}/ns/{name}").st_ino == os.stat(f"/proc/self/ns/{name}").st_ino
