"""cgroup v1 (legacy and hybrid hosts): one directory per container in each hierarchy we use.

Layout: `<mount of X>/minictr/minictr-<launcher pid>@<its PID namespace>-<id>` for each of
the memory, cpu, cpuacct, pids and freezer hierarchies the host mounts; controllers mounted
together (the usual `cpu,cpuacct`) share one directory. Mount points come from
/proc/self/mountinfo, never from guessed paths. The freezer is required: without it a fork
loop could outrun kill().
"""

from __future__ import annotations

import os

from pytest_minictr.errors import UnsupportedError
from pytest_minictr.spec import Limits

from . import files
from .base import (
    CPU_PERIOD_US,
    LIMIT_CONTROLLERS,
    Cgroup,
    CgroupBackend,
    CgroupStats,
)
from .mounts import CgroupMount
from .names import PARENT_NAME, check_group_name


class V1Backend(CgroupBackend):
    name = "v1"

    def __init__(self, mount_points: dict[str, str]):
        self.mount_points = mount_points          # controller -> its hierarchy's mount point
        super().__init__(tuple(dict.fromkeys(os.path.join(mount_point, PARENT_NAME)
                                             for mount_point in mount_points.values())))

    @classmethod
    def probe(cls, mounts: tuple[CgroupMount, ...], prepare: bool = True) -> V1Backend:
        """The backend for these v1 mounts, or UnsupportedError saying why and the fix."""
        by_controller: dict[str, CgroupMount] = {}
        for mount in mounts:
            for controller in mount.controllers:
                by_controller.setdefault(controller, mount)    # first mount wins, as for /proc
        if os.geteuid() != 0:
            raise UnsupportedError(
                f"cgroup v1: running as uid {os.geteuid()}, and cgroup v1 cannot be delegated "
                "to an unprivileged user; run as root, or on a cgroup v2 host start the tests "
                "in a delegated cgroup: `systemd-run --user --scope -p Delegate=yes <command>`")
        if "freezer" not in by_controller:
            raise UnsupportedError(
                "cgroup v1: the freezer controller is not mounted (see /proc/self/mountinfo); "
                "minictr needs it to kill a container without letting a fork escape: mount it "
                "(`mount -t cgroup -o freezer freezer /sys/fs/cgroup/freezer`) or use cgroup v2")
        read_only = sorted({m.mount_point for m in by_controller.values() if m.read_only})
        if read_only:
            raise UnsupportedError(
                f"cgroup v1 hierarchies mounted read-only: {', '.join(read_only)} (as inside "
                "most containers): run on the host, or give the container a writable cgroupfs "
                "(e.g. `docker run --privileged`)")
        backend = cls({c: m.mount_point for c, m in sorted(by_controller.items())})
        if prepare:
            backend.prepare_parents()
        return backend

    def prepare_parents(self) -> None:
        """mkdir `minictr` in each hierarchy (again when a create() finds one gone)."""
        for parent in self.parent_dirs:
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise UnsupportedError(f"cannot create the cgroup {parent}: {e.strerror} "
                                       "(run as root with a writable cgroupfs)") from e

    def check_limits(self, limits: Limits) -> None:
        for limit, controller in LIMIT_CONTROLLERS:
            if getattr(limits, limit) is not None and controller not in self.mount_points:
                raise UnsupportedError(
                    f"the {limit} limit needs the cgroup v1 {controller} controller, which is "
                    "not mounted on this host (see /proc/self/mountinfo); mount it or use "
                    "cgroup v2")

    def cpu_usage_problem(self) -> str | None:
        return None if "cpuacct" in self.mount_points else (
            "the cgroup v1 cpuacct controller, which counts a group's CPU time, is not mounted "
            "on this host (see /proc/self/mountinfo); mount it or use cgroup v2")

    def create(self, name: str, limits: Limits) -> V1Cgroup:
        check_group_name(name)
        self.check_limits(limits)
        group = self.open(name)
        try:
            for path in group.paths:
                files.make_fresh_dir(path, self.prepare_parents)
            group.apply_limits(limits)
        except BaseException:
            group.discard()  # (the directories not made yet are not there to remove)
            raise
        return group

    def open(self, name: str) -> V1Cgroup:
        return V1Cgroup(name, {controller: os.path.join(mount_point, PARENT_NAME, name)
                               for controller, mount_point in self.mount_points.items()})


def _apply_limits(dirs: dict[str, str], limits: Limits) -> None:
    if limits.memory is not None:
        files.write_value(os.path.join(dirs["memory"], "memory.limit_in_bytes"), limits.memory)
        memsw = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            # Memory+swap, present only with swap accounting on. Same value: the limit is on
            # RAM and nothing may spill into swap. It must be >= the RAM limit, hence second.
            files.write_value(memsw, limits.memory)
        # The OOM killer stays enabled (memory.oom_control untouched): with it disabled, a
        # container at its limit would hang instead of dying.
    if limits.cpus is not None:
        quota = round(limits.cpus * CPU_PERIOD_US)
        files.write_value(os.path.join(dirs["cpu"], "cpu.cfs_period_us"), CPU_PERIOD_US)
        files.write_value(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), quota)
    if limits.pids is not None:
        files.write_value(os.path.join(dirs["pids"], "pids.max"), limits.pids)


class V1Cgroup(Cgroup):
    def __init__(self, name: str, dirs: dict[str, str]):
        super().__init__(name, tuple(dict.fromkeys(dirs.values())))
        self.dirs = dirs                          # controller -> directory (shared if co-mounted)

    def apply_limits(self, limits: Limits) -> None:
        _apply_limits(self.dirs, limits)

    def cpu_usage(self) -> float | None:
        cpuacct = self.dirs.get("cpuacct")
        usage_ns = files.read_int(os.path.join(cpuacct, "cpuacct.usage")) if cpuacct else None
        return None if usage_ns is None else usage_ns / 1e9

    def stats(self) -> CgroupStats:
        memory, pids = self.dirs.get("memory"), self.dirs.get("pids")
        oom_control = files.read_keyed(os.path.join(memory, "memory.oom_control")) \
            if memory else {}
        return CgroupStats(
            memory_peak=files.read_int(os.path.join(memory, "memory.max_usage_in_bytes"))
            if memory else None,
            memory_current=files.read_int(os.path.join(memory, "memory.usage_in_bytes"))
            if memory else None,
            cpu_time=self.cpu_usage(),
            oom_killed=oom_control.get("oom_kill", 0) > 0,     # the line exists since 4.13
            pids_current=files.read_int(os.path.join(pids, "pids.current")) if pids else None,
        )

    def _kill_round(self) -> None:
        # "FREEZING" until every task has stopped
        state = os.path.join(self.dirs["freezer"], "freezer.state")
        self._kill_frozen(state, "FROZEN", "THAWED",
                          lambda: (files.read_text(state) or "").strip() == "FROZEN")
