"""cgroup v2, the unified hierarchy: one leaf directory per container.

Layout: `<base>/minictr/minictr-<launcher pid>@<its PID namespace>-<n>`. The `minictr`
parent holds no process (the kernel's no-internal-process rule) and enables in its
`cgroup.subtree_control` the controllers we use (memory, cpu, pids) that its base passes down.
As root the base is the hierarchy's root, whose `cgroup.subtree_control` belongs to the host:
we read it and never write it. Without root the base is our own cgroup when it was delegated
to us (systemd's `Delegate=yes`: we may write its files); being ours, its processes (the
caller, the launcher) move to a leaf so that it may pass controllers down, and it enables what
it was given.
"""

from __future__ import annotations

import os

from pytest_minictr.errors import UnsupportedError
from pytest_minictr.spec import Limits

from . import files
from .base import (
    CPU_PERIOD_US,
    LIMIT_CONTROLLERS,
    V2_CONTROLLERS,
    Cgroup,
    CgroupBackend,
    CgroupStats,
)
from .mounts import CgroupMount
from .names import PARENT_NAME, check_group_name

ROOTLESS_FIX = "systemd-run --user --scope -p Delegate=yes"
CALLERS_LEAF = "callers"  # where a delegated base's own processes move


class V2Backend(CgroupBackend):
    name = "v2"

    def __init__(self, root: str, base: str | None = None):
        self.root = root
        self.base = base or root       # where our parent lives (see the module's docstring)
        self.parent = os.path.join(self.base, PARENT_NAME)
        super().__init__((self.parent,))
        self._unavailable: dict[str, str] = {}    # controller -> why we cannot use it

    @classmethod
    def probe(cls, mount: CgroupMount, prepare: bool = True) -> V2Backend:
        """The backend for this cgroup2 mount, or UnsupportedError saying why and the fix."""
        if mount.read_only:
            raise UnsupportedError(
                f"cgroup v2 at {mount.mount_point} is mounted read-only (as inside most "
                "containers): run on the host, or give the container a writable cgroupfs "
                "(e.g. `docker run --privileged --cgroupns=private`)")
        base = None
        if os.geteuid() != 0:
            base = delegated_cgroup(mount.mount_point)
            if base is None:
                raise UnsupportedError(
                    f"cgroup v2 at {mount.mount_point}: running as uid {os.geteuid()}, and only "
                    "root may create cgroups outside a delegated subtree; run as root, or start "
                    f"the tests in a delegated cgroup: `{ROOTLESS_FIX} <command>`")
        backend = cls(mount.mount_point, base)
        if prepare:
            backend.prepare_parent()
        return backend

    def prepare_parent(self) -> None:
        """mkdir `<root>/minictr` and enable our controllers below it, noting what is missing.

        Done at start-up, and again when a create() finds the directory gone (another
        launcher's release(), or an admin): not before each create, which would cost a
        container start a makedirs and three reads.
        """
        try:
            os.makedirs(self.parent, exist_ok=True)
        except OSError as e:
            raise UnsupportedError(f"cannot create the cgroup {self.parent}: {e.strerror} "
                                   "(run as root with a writable cgroupfs)") from e
        if self.base != self.root:
            self._take_over_delegated_base()
        offered = _read_words(os.path.join(self.base, "cgroup.controllers"))
        passed_down = _read_words(os.path.join(self.base, "cgroup.subtree_control"))
        enabled = _read_words(os.path.join(self.parent, "cgroup.subtree_control"))
        unavailable = {}
        for controller in V2_CONTROLLERS:
            if controller in enabled:
                continue
            if controller not in offered:
                unavailable[controller] = (
                    f"no {controller} controller reaches {self.base} (bound to a cgroup v1 "
                    "hierarchy, disabled on the kernel command line, or not delegated to us)")
            elif controller not in passed_down:
                unavailable[controller] = (
                    f"{controller} is not enabled in {self.base}/cgroup.subtree_control, which "
                    f"belongs to the host and which minictr does not change; enable it with "
                    f"`echo +{controller} > {self.base}/cgroup.subtree_control`")
            else:
                try:
                    # One controller per write: a refused one (cpu, while a realtime thread
                    # lives outside the root group) must not take the others down with it.
                    files.write_raw(os.path.join(self.parent, "cgroup.subtree_control"),
                              f"+{controller}")
                except OSError as e:
                    unavailable[controller] = (f"cannot enable {controller} in "
                                               f"{self.parent}/cgroup.subtree_control: "
                                               f"{e.strerror}")
        self._unavailable = unavailable

    def _take_over_delegated_base(self) -> None:
        """Move the base's processes to a leaf (a cgroup with processes cannot pass
        controllers down), then enable in it every controller it was given."""
        pids = _read_words(os.path.join(self.base, "cgroup.procs"))
        if pids:
            leaf = os.path.join(self.base, CALLERS_LEAF)
            os.makedirs(leaf, exist_ok=True)
            for pid in pids:
                try:
                    files.write_raw(os.path.join(leaf, "cgroup.procs"), pid)
                except OSError:
                    pass  # gone meanwhile, or not ours to move: enabling then says so
        offered = _read_words(os.path.join(self.base, "cgroup.controllers"))
        enabled = _read_words(os.path.join(self.base, "cgroup.subtree_control"))
        for controller in offered & set(V2_CONTROLLERS) - enabled:
            try:
                files.write_raw(os.path.join(self.base, "cgroup.subtree_control"),
                                f"+{controller}")
            except OSError:
                pass  # noted as unavailable, with the reason, by prepare_parent()

    def check_limits(self, limits: Limits) -> None:
        for limit, controller in LIMIT_CONTROLLERS:
            if getattr(limits, limit) is not None and controller in self._unavailable:
                raise UnsupportedError(f"the {limit} limit needs the cgroup v2 {controller} "
                                       f"controller: {self._unavailable[controller]}")

    def create(self, name: str, limits: Limits) -> V2Cgroup:
        check_group_name(name)
        self.check_limits(limits)
        group = self.open(name)
        files.make_fresh_dir(group.path, self.prepare_parent)
        try:
            group.apply_limits(limits)
        except BaseException:
            group.discard()
            raise
        return group

    def open(self, name: str) -> V2Cgroup:
        return V2Cgroup(name, os.path.join(self.parent, name))


def _apply_limits(path: str, limits: Limits) -> None:
    if limits.memory is not None:
        files.write_value(os.path.join(path, "memory.max"), limits.memory)
        swap_max = os.path.join(path, "memory.swap.max")
        if os.path.exists(swap_max):
            # The limit is on RAM; without this the kernel would let the rest spill into swap.
            files.write_value(swap_max, 0)
    oom_group = os.path.join(path, "memory.oom.group")
    if os.path.exists(oom_group):
        # The OOM killer then takes the whole container, not just its biggest process: a
        # half-killed container (init alive, worker gone) would only hang until the timeout.
        files.write_value(oom_group, 1)
    if limits.cpus is not None:
        quota = round(limits.cpus * CPU_PERIOD_US)
        files.write_value(os.path.join(path, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
    if limits.pids is not None:
        files.write_value(os.path.join(path, "pids.max"), limits.pids)


class V2Cgroup(Cgroup):
    def __init__(self, name: str, path: str):
        super().__init__(name, (path,))
        self.path = path

    def apply_limits(self, limits: Limits) -> None:
        _apply_limits(self.path, limits)

    def cpu_usage(self) -> float | None:
        # cpu.stat's usage_usec is there with or without the cpu controller (core accounting)
        usage_usec = files.read_keyed(os.path.join(self.path, "cpu.stat")).get("usage_usec")
        return None if usage_usec is None else usage_usec / 1e6

    def stats(self) -> CgroupStats:
        return CgroupStats(
            memory_peak=files.read_int(os.path.join(self.path, "memory.peak")),       # 5.19+
            memory_current=files.read_int(os.path.join(self.path, "memory.current")),
            cpu_time=self.cpu_usage(),
            oom_killed=files.read_keyed(os.path.join(self.path, "memory.events"))
                       .get("oom_kill", 0) > 0,
            pids_current=files.read_int(os.path.join(self.path, "pids.current")),
        )

    def _kill_round(self) -> None:
        kill_file = os.path.join(self.path, "cgroup.kill")
        if os.path.exists(kill_file):
            # 5.14+: the kernel kills the subtree and any task forked while it does so.
            files.write_value(kill_file, 1)
            return
        # older kernels: through the freezer
        self._kill_frozen(os.path.join(self.path, "cgroup.freeze"), 1, 0, self._is_frozen)

    def _is_frozen(self) -> bool:
        return files.read_keyed(os.path.join(self.path, "cgroup.events")).get("frozen") == 1


def delegated_cgroup(mount_point: str) -> str | None:
    """Our own cgroup's directory if we may manage it (its files writable by us), else None."""
    try:
        with open("/proc/self/cgroup") as membership:
            path = next(line[3:].strip() for line in membership if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    directory = os.path.join(mount_point, path.lstrip("/"))
    writable = all(os.access(os.path.join(directory, name), os.W_OK)
                   for name in ("", "cgroup.procs", "cgroup.subtree_control"))
    return directory if writable else None


def _read_words(path: str) -> set[str]:
    return set((files.read_text(path) or "").split())
