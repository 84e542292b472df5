"""/proc/PID/stat, read in one place: a process's state, parent and start time.

The second field, the command name in parentheses, may itself hold spaces and ')' (a process
names itself with prctl(PR_SET_NAME)): the fields after it are found from the last ')'.
"""

from __future__ import annotations

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
