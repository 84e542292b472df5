"""Where the host mounts its cgroup hierarchies: the cgroup and cgroup2 lines of
/proc/self/mountinfo, read, never guessed from paths."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import V1_CONTROLLERS


@dataclass(frozen=True)
class CgroupMount:
    """One cgroupfs mount from /proc/self/mountinfo."""

    mount_point: str
    version: int                        # 1 (fstype cgroup) or 2 (fstype cgroup2)
    controllers: frozenset[str]         # v1: the ones of V1_CONTROLLERS it carries; v2: empty
    read_only: bool



def parse_cgroup_mounts(mountinfo: str) -> tuple[CgroupMount, ...]:
    """The cgroup mounts in a mountinfo text, in mount order.

    Controllers are read from the super options ("rw,cpu,cpuacct"), never guessed from the
    path: distributions mount cpu and cpuacct together or apart, under either name.
    """
    mounts = []
    for line in mountinfo.splitlines():
        mount_fields, sep, fs_fields = line.partition(" - ")
        if not sep:
            continue
        mount_part, fs_part = mount_fields.split(), fs_fields.split()
        if len(mount_part) < 6 or len(fs_part) < 3 or fs_part[0] not in ("cgroup", "cgroup2"):
            continue
        mount_options, super_options = mount_part[5].split(","), fs_part[2].split(",")
        mounts.append(CgroupMount(
            mount_point=_unescape_mountinfo(mount_part[4]),
            version=2 if fs_part[0] == "cgroup2" else 1,
            controllers=frozenset(super_options) & frozenset(V1_CONTROLLERS)
            if fs_part[0] == "cgroup" else frozenset(),
            read_only="ro" in mount_options or "ro" in super_options,
        ))
    return tuple(mounts)


def read_cgroup_mounts() -> tuple[CgroupMount, ...]:
    with open("/proc/self/mountinfo") as f:
        return parse_cgroup_mounts(f.read())


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
