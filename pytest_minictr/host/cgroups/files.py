"""The file-level steps v1 and v2 share: reading and writing cgroupfs files (limits in,
figures out), listing a group's processes, making and removing its directories, killing
what it lists without signalling a recycled pid.

Everything here is plain file I/O on a mounted cgroupfs: we never mount, remount or move the
host's hierarchies, we only make directories under them.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable

from pytest_minictr.errors import MinictrError
from pytest_minictr.host import linux
from pytest_minictr.host.proc import read_stat

REMOVE_TIMEOUT = 2.0             # seconds rmdir keeps retrying EBUSY


def write_raw(path: str, value: str | int) -> None:
    """One write(2) per value (see linux.write_file); OSError as it comes."""
    linux.write_file(path, str(value))


def write_value(path: str, value: str | int) -> None:
    try:
        write_raw(path, value)
    except OSError as e:
        raise MinictrError(f"cannot write {str(value)!r} to {path}: {e.strerror}") from e


def read_text(path: str) -> str | None:
    """The file's text, or None if this kernel (or a missing controller) has no such file.
    (Five of these end each container: linux.read_file, not a text file object.)"""
    try:
        return linux.read_file(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None or not text.strip().lstrip("-").isdigit():
        return None                # missing, or "max"
    return int(text)


def read_keyed(path: str) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, memory.oom_control) as a dict."""
    values = {}
    for line in (read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def list_processes(path: str) -> set[int]:
    """Pids in the group at `path` and in any group below it (a container that got write access
    to its cgroup could otherwise hide a process in a child group)."""
    pids: set[int] = set()
    for dirpath, _, _ in os.walk(path):
        text = read_text(os.path.join(dirpath, "cgroup.procs")) or ""
        pids.update(int(pid) for pid in text.split())
    return pids


def make_fresh_dir(path: str, make_parent: Callable[[], None]) -> None:
    """mkdir, replacing an empty leftover of the same name (a launcher pid can be reused).
    `make_parent()` makes the `minictr` parent again if it is gone: another launcher, exiting,
    may have removed it just now (see release()), or an admin. Only then: a container's group
    is made on every start, and the parent is nearly always there."""
    try:
        os.mkdir(path)
    except FileExistsError:
        remove_group_dir(path, timeout=0)
        os.mkdir(path)
    except FileNotFoundError:
        make_parent()
        os.mkdir(path)


def remove_group_dir(path: str, timeout: float = REMOVE_TIMEOUT) -> None:
    """rmdir the group and any child groups, deepest first; EBUSY is retried until `timeout`.

    rmdir of a cgroup fails with EBUSY while a task is still charged to it, and a task killed
    a moment ago may still be exiting: retry with small sleeps instead of failing at once.
    """
    try:
        os.rmdir(path)  # nearly always enough: walking a group lists its dozens of files
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.EBUSY:  # (EBUSY: a child group, or a task still exiting)
            raise MinictrError(f"cannot remove cgroup {path}: {e.strerror}") from e
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            for dirpath, _, _ in os.walk(path, topdown=False):
                os.rmdir(dirpath)
            return
        except FileNotFoundError:
            continue               # a child went away while we walked; walk again
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise MinictrError(f"cannot remove cgroup {path}: {e.strerror}") from e
            if time.monotonic() >= deadline:
                left = sorted(list_processes(path))
                raise MinictrError(
                    f"cannot remove cgroup {path}: still busy after {timeout:g} s "
                    f"(processes inside: {left or 'none listed, a task is still exiting'}); "
                    "kill() the group first") from e
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def kill_listed(pids: set[int], listed_now: Callable[[], set[int]]) -> None:
    """SIGKILL each pid, but only while it is still listed in the group.

    A pid read from cgroup.procs may exit and be reused by an unrelated process before we
    signal it. A pidfd pins the process we looked at: we open them all, list the group again,
    and signal only the pidfds whose pid is still in the group.
    """
    pidfds = {}
    try:
        for pid in pids:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                pass
        still_inside = listed_now()
        for pid, pidfd in pidfds.items():
            if pid in still_inside:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` with growing sleeps (1 ms to 20 ms); True once it holds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def is_zombie(pid: int) -> bool:
    """A process that has exited and holds nothing but its entry, until its parent reaps it."""
    stat = read_stat(pid)
    return stat is None or stat.has_exited  # None: gone between the listing and now
