"""Reaping what dead launchers left: the groups whose owner (named in the group's name, see
`names`) is gone are killed and removed when a launcher starts. It needs of a backend only its
parent directories and a way to open a group by name (see `CgroupBackend.reap_stale`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Protocol

from pytest_minictr.errors import MinictrError

from .files import is_zombie, list_processes
from .names import Owner, own_pid_namespace, owner_of

# seconds: a group of another PID namespace's launcher is only removed once empty and this
# old (see reap_orphans): a young empty one may be a spare's, about to be joined.
FOREIGN_GRACE = 60.0


class Group(Protocol):
    """What reaping needs of a group (a `Cgroup`)."""

    paths: tuple[str, ...]

    def kill(self) -> None: ...

    def remove(self) -> None: ...


def reap_orphans(parent_dirs: tuple[str, ...], open_group: Callable[[str], Group],
               grace: float = FOREIGN_GRACE) -> list[str]:
    """Kill and remove the groups whose owner launcher is dead; returns their names.

    Groups of live launchers (pytest-xdist runs several) are left alone. Only a launcher
    of our own PID namespace can be judged: its pid means the same here. One in another
    namespace (a CI job in a container that shares this host's cgroupfs, or the host seen
    from such a job) is never killed, whatever its pid is here; its group is removed once
    empty and older than `grace` seconds (when a PID namespace ends, the kernel kills all
    in it, so a dead namespace's groups are empty). A group that cannot be removed (a task
    stuck in the kernel) is reported as a warning, not raised: it belongs to nobody, and
    blocking every later launcher on it would help nobody.
    """
    here = own_pid_namespace()
    removed = []
    for name, owner in sorted(_groups_by_owner(parent_dirs).items()):
        if owner.pid_namespace == here:
            if not process_is_alive(owner.pid) and _kill_and_remove(open_group(name)):
                removed.append(name)
        elif _remove_if_empty_since(open_group(name).paths, time.time() - grace):
            removed.append(name)
    return removed


def _groups_by_owner(parent_dirs: tuple[str, ...]) -> dict[str, Owner]:
    """Our groups under every parent, by name: the launcher each name says made it."""
    groups: dict[str, Owner] = {}
    for parent in parent_dirs:
        try:
            entries = os.listdir(parent)
        except FileNotFoundError:
            continue
        for entry in entries:
            owner = owner_of(entry)
            if owner is not None:
                groups[entry] = owner
    return groups


def _kill_and_remove(group: Group) -> bool:
    try:
        group.kill()
        group.remove()
    except MinictrError as e:
        # stacklevel: the warning names the caller of CgroupBackend.reap_stale
        warnings.warn(f"stale cgroup left behind: {e}", RuntimeWarning, stacklevel=4)
        return False
    return True


def _remove_if_empty_since(group_paths: tuple[str, ...], made_before: float) -> bool:
    """rmdir the group if it was made before `made_before` and holds no process (a pid
    of a namespace we cannot see reads 0 in cgroup.procs: it counts); once, quietly (a
    process that joins meanwhile makes rmdir fail, and the group is its owner's)."""
    paths = [path for path in group_paths if os.path.isdir(path)]
    try:
        if any(os.stat(path).st_mtime > made_before or list_processes(path)
               for path in paths):
            return False
        for path in paths:
            os.rmdir(path)
    except FileNotFoundError:
        pass  # removed meanwhile (by its owner)
    except OSError:
        return False
    return True


def process_is_alive(pid: int) -> bool:
    """True if `pid` runs; a zombie counts as dead, since it will never clean up after itself."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                       # exists, owned by someone else
    return not is_zombie(pid)
