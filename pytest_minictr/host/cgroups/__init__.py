"""The container's cgroup: limits, measurement, and a kill that nothing escapes.

    from pytest_minictr.host import cgroups
    backend = cgroups.detect()                       # once per process: v1 or v2
    group = backend.create(cgroups.group_name(container_id), limits)
    group.join(pid)                                  # by the container's first child, pre-exec
    group.stats(); group.kill(); group.remove()
    group.discard()                                  # remove, killing first; never raises

    backend = cgroups.detect_or_null()               # or NullBackend(problem): no limits

One small interface (`CgroupBackend`, `Cgroup`, `CgroupStats`) with a backend per cgroup
version behind it, chosen once at run time from /proc/self/mountinfo; callers never test the
version. Hybrid hosts (v1 controllers plus a controller-less cgroup2 at .../unified) are v1.
"""

from __future__ import annotations

import sys

from pytest_minictr.errors import MinictrError, UnsupportedError

from .base import V1_CONTROLLERS, Cgroup, CgroupBackend, CgroupStats
from .mounts import CgroupMount, parse_cgroup_mounts, read_cgroup_mounts
from .names import Owner, group_name, owner_of
from .null import NullBackend, NullCgroup
from .v1 import V1Backend
from .v2 import V2Backend

__all__ = ["Cgroup", "CgroupBackend", "CgroupMount", "CgroupStats", "NullBackend", "NullCgroup",
           "Owner", "detect", "detect_or_null", "group_name", "owner_of", "parse_cgroup_mounts",
           "reap_stale"]


def detect(prepare: bool = True) -> CgroupBackend:
    """The cgroup backend of this host, ready to create groups (our `minictr` parents exist;
    with prepare=False nothing is created: for reports that only look).

    v1 if any controller we use is mounted as a v1 hierarchy (a controller bound to v1 is
    absent from cgroup2, so a hybrid host's cgroup2 is of no use to us); else v2 if cgroup2 is
    mounted. Raises UnsupportedError naming the reason and the fix otherwise.
    """
    if not sys.platform.startswith("linux"):
        raise UnsupportedError(f"cgroups exist only on Linux, not on {sys.platform}")
    try:
        mounts = read_cgroup_mounts()
    except OSError as e:
        raise UnsupportedError(f"cannot read /proc/self/mountinfo ({e.strerror}): "
                               "mount /proc to use cgroups") from e
    v1_mounts = tuple(m for m in mounts if m.version == 1 and m.controllers)
    if v1_mounts:
        return V1Backend.probe(v1_mounts, prepare)
    unified = next((m for m in mounts if m.version == 2), None)
    if unified is not None:
        return V2Backend.probe(unified, prepare)
    raise UnsupportedError(
        "no cgroup filesystem is mounted (none in /proc/self/mountinfo): mount cgroup2 "
        "(`mount -t cgroup2 none /sys/fs/cgroup`) or the v1 hierarchies "
        f"({', '.join(V1_CONTROLLERS)})")


def detect_or_null(prepare: bool = True) -> CgroupBackend:
    """As detect(); where the host gives us no usable cgroups, the `NullBackend`, whose
    `problem` says why (containers then run without limits or measurements)."""
    try:
        return detect(prepare)
    except MinictrError as problem:
        return NullBackend(str(problem))


def reap_stale(backend: CgroupBackend | None = None) -> list[str]:
    """Kill and remove the groups left by dead launchers; returns their names.

    Called once when a launcher starts. Where this process cannot use cgroups at all, nothing
    of ours can be removed either, so that is not an error here: [] is returned.
    """
    return (backend or detect_or_null()).reap_stale()
