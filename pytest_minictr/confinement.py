"""What loosens a container's confinement, by name: the capabilities it may keep, the resource
limits it may set, the calls of the default seccomp filter it may let through; the lists of
those names and the checks of what a user names against them. And who the command runs as
inside (`run_as`, Docker's --user).

The names are declared here, at the bottom, so that one list serves both sides: the checks at
the edge (`allow_syscalls=`, `capabilities=`, `rlimits=`) and the container side that turns
them into numbers and a filter (`container.security`, `container.seccomp`).
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_minictr.errors import ConfigError
from pytest_minictr.validate import check_sequence

# linux/capability.h, by number
CAPABILITY_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE")
# Capabilities over a network namespace: they count only in one that container root's user
# namespace owns, so asking for one gets the container a network namespace made inside it.
NETWORK_CAPABILITIES = frozenset({"NET_ADMIN", "NET_RAW", "NET_BROADCAST"})

# resource.RLIMIT_* by the names of setrlimit(2) and `ulimit`
RLIMIT_NAMES = {name.lower()[len("RLIMIT_"):]: getattr(resource, name)
                for name in dir(resource) if name.startswith("RLIMIT_")}
UNLIMITED = resource.RLIM_INFINITY  # -1 to Python: never compare it as a number

# The calls of the default seccomp filter (their numbers and the program: `container.seccomp`).
# Denied outright, with EPERM (what the call returns without privilege: programs handle it).
DENIED = (
    # the kernel keyring is not namespaced: keys of the host and of other containers
    "add_key", "keyctl", "request_key",
    # replacing or extending the running kernel
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "query_module", "get_kernel_syms",
    # attack surface far larger than any test needs
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "lookup_dcookie", "kcmp", "fanotify_init",
    # the filesystem view stays the one we built
    "mount", "umount2", "move_mount", "open_tree", "open_tree_attr", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "pivot_root", "setns",
    # host-wide state
    "swapon", "swapoff", "reboot", "acct", "settimeofday", "clock_settime", "clock_adjtime",
    "syslog", "quotactl", "quotactl_fd", "nfsservctl", "vhangup", "sysfs", "_sysctl", "ustat",
    "uselib", "iopl", "ioperm",
    # the inode-handle escape ("shocker", 2014): open any inode of a filesystem by number
    "open_by_handle_at",
)
# Denied for some arguments only (which ones: container.seccomp.ARGUMENT_RULES).
DENIED_FOR_SOME_ARGUMENTS = ("clone", "unshare", "ioctl")
# clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libc fall back
# to clone, whose flags we see.
NOT_IMPLEMENTED = ("clone3",)
FILTERED = tuple(sorted({*DENIED, *NOT_IMPLEMENTED, *DENIED_FOR_SOME_ARGUMENTS}))
# The machines the filter has a syscall table for (container.seccomp.ARCHITECTURES)
SECCOMP_MACHINES = ("x86_64", "aarch64")


def check_syscalls(names: Any, name: str = "allow_syscalls") -> tuple[str, ...]:
    return _check_names(names, name, FILTERED, "not a call the default seccomp filter denies")


def check_seccomp_here(seccomp: bool) -> None:
    """The filter is written per architecture: on another one it cannot be installed."""
    if seccomp and os.uname().machine not in SECCOMP_MACHINES:
        raise ConfigError(f"seccomp=True: no syscall table for {os.uname().machine} "
                          f"(known: {', '.join(SECCOMP_MACHINES)}); pass seccomp=False")


def check_capabilities(names: Any, name: str = "capabilities") -> tuple[str, ...]:
    return _check_names(names, name, CAPABILITY_NAMES, "not a capability",
                        normalize=capability_name)


def capability_name(name: str) -> str:
    """'net_raw', 'CAP_NET_RAW' -> 'NET_RAW'."""
    name = name.upper()
    return name[len("CAP_"):] if name.startswith("CAP_") else name


def _check_names(names: Any, keyword: str, known: Sequence[str], problem: str,
                 normalize: Callable[[str], str] = lambda name: name) -> tuple[str, ...]:
    for name in check_sequence(names, keyword):
        if not isinstance(name, str) or normalize(name) not in known:
            raise ConfigError(f"{keyword}: {name!r} is {problem} (known: {', '.join(known)})")
    return tuple(normalize(name) for name in names)


def check_rlimits(rlimits: Any, keyword: str = "rlimits") -> tuple[tuple[str, int, int], ...]:
    """{'nofile': 8192, 'core': 'unlimited', 'stack': (8M, 64M)}: one value sets both the
    soft and the hard limit; a pair sets them apart."""
    if rlimits is None:
        return ()
    if not isinstance(rlimits, Mapping):
        raise ConfigError(f"{keyword}={rlimits!r}: expected a dict such as {{'nofile': 8192}}")
    checked = []
    for name, value in rlimits.items():
        if name not in RLIMIT_NAMES:
            raise ConfigError(f"{keyword}: unknown limit {name!r} "
                              f"(known: {', '.join(sorted(RLIMIT_NAMES))})")
        pair = value if isinstance(value, tuple) and len(value) == 2 else (value, value)
        soft, hard = (_rlimit_value(keyword, name, value, v) for v in pair)
        if hard != UNLIMITED and (soft == UNLIMITED or soft > hard):
            raise ConfigError(f"{keyword}: {name}={value!r}: the soft limit exceeds the hard one")
        checked.append((name, soft, hard))
    return tuple(checked)


def _rlimit_value(keyword: str, name: str, shown: Any, value: Any) -> int:
    if value is None or value == "unlimited":
        return UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ConfigError(f"{keyword}: {name}={shown!r}: expected a number from 0 to 2**63, "
                          "'unlimited', or a (soft, hard) pair of them")
    return value


MAX_ID = 2 ** 32 - 1  # (uid_t)-1 means "unchanged" to setresuid: never an id


def check_run_as(value: Any, name: str = "run_as") -> tuple[int, int] | None:
    """Docker's --user in numbers: 1000 or '1000' (gid 0, as Docker gives a uid without a
    passwd entry), '1000:1000' or (1000, 1000). Names are not looked up: a rootfs built from
    host binaries has no accounts. Whether the ids are mapped is the launcher's to say."""
    if value is None:
        return None
    if isinstance(value, str):
        user, colon, group = value.partition(":")
        pair: Any = (user, group if colon else "0")
    else:
        pair = (value, 0) if isinstance(value, int) else value
    ids = [_id_number(v) for v in pair] \
        if isinstance(pair, (tuple, list)) and len(pair) == 2 else [None, None]
    uid, gid = ids
    if uid is None or gid is None:
        raise ConfigError(f"{name}={value!r}: expected UID[:GID] as numbers from 0 to "
                          f"{MAX_ID - 1}, e.g. 1000 or '1000:1000' (names are not looked up)")
    return uid, gid


def _id_number(value: Any) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_ID
    return value if ok else None


def check_network_sharing(values: Mapping[str, Any]) -> None:
    """Ports and pods need the loopback of a network namespace made as the spec says."""
    if values["network"] == "none" and (values["ports"] or values["pod"]):
        what = (f"ports={[port.container_port for port in values['ports']]!r}"
                if values["ports"] else "pod=")
        raise ConfigError(f"network='none' and {what}: a published port or a pod is reached "
                          "on the container's loopback; use network='loopback'")
    if values["pod"] is not None and values["ports"]:
        raise ConfigError("ports= and pod=: a pod's containers share its ports; publish "
                          "them on the pod: runtime.pod(ports=[...])")
    kept = NETWORK_CAPABILITIES & set(values["capabilities"])
    if values["pod"] is not None and kept:
        raise ConfigError(f"capabilities={sorted(kept)!r} and pod=: a network capability "
                          "gives the container a network namespace of its own (see "
                          "`security`), so it cannot share the pod's")


def with_cpu_backstop(rlimits: tuple[tuple[str, int, int], ...],
                      cpu_time: float | None) -> tuple[tuple[str, int, int], ...]:
    """`rlimits` with RLIMIT_CPU as the backstop of a CPU-time limit: the launcher kills the
    container once its cgroup used `cpu_time` (see launcher.cpu_watch), and should the
    launcher be late (stopped, starved), the kernel kills a process that has run a second
    past it (RLIMIT_CPU counts whole seconds, per process). A cpu rlimit given is kept."""
    if cpu_time is None or any(name == "cpu" for name, _, _ in rlimits):
        return rlimits
    seconds = math.ceil(cpu_time) + 1
    return (*rlimits, ("cpu", seconds, seconds))
