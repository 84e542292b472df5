"""Our cgroups' names: each names the launcher that owns it (its pid, and its PID namespace),
so that a later launcher can tell a dead owner's groups (see `reaping`) from those of a live
one, wherever it runs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pytest_minictr.errors import ConfigError

PARENT_NAME = "minictr"          # our one directory under each hierarchy's root
GROUP_PREFIX = "minictr-"        # per container: minictr-<launcher pid>@<its PID ns>-<serial>
_GROUP_NAME_RE = re.compile(r"^minictr-(\d+)(?:@(\d+))?-[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Owner:
    """The launcher a group name names: its pid, as seen in its PID namespace (the inode of
    /proc/<pid>/ns/pid; None in a name made before names carried it)."""

    pid: int
    pid_namespace: int | None


def group_name(container_id: str, owner_pid: int | None = None,
               pid_namespace: int | None = None) -> str:
    """The cgroup name of a container. Its owner (the launcher: this process unless said) and
    that owner's PID namespace let `reap_stale` find orphans: a pid means something only in
    its own namespace, and launchers in containers may share the host's cgroupfs."""
    pid = os.getpid() if owner_pid is None else owner_pid
    namespace = own_pid_namespace() if pid_namespace is None else pid_namespace
    return f"{GROUP_PREFIX}{pid}@{namespace}-{container_id}"


def owner_of(name: str) -> Owner | None:
    """The launcher a group name names, or None if the name is not one of ours."""
    match = _GROUP_NAME_RE.match(name)
    if match is None:
        return None
    return Owner(int(match.group(1)), None if match.group(2) is None else int(match.group(2)))


def own_pid_namespace() -> int:
    """Our PID namespace's inode (0 where /proc cannot tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def check_group_name(name: str) -> None:
    if owner_of(name) is None:
        raise ConfigError(f"cgroup name {name!r}: expected 'minictr-<launcher pid>@<its PID "
                          "namespace>-<id>' (id of letters, digits, '_', '.', '-'); use "
                          "cgroups.group_name()")
