"""What the command may still do once it runs: capabilities, no_new_privs, rlimits, keyring,
seccomp. Applied by the container's init as the last step before the command is spawned (the
command inherits it all through execve, and cannot undo any of it).

The order is the kernel's: rlimits first (raising a hard limit needs CAP_SYS_RESOURCE, gone
later; `limit_resources`), the id switch into the container's user namespace (entering one
fills every set again, the bounding set too), then (`drop_privileges`) the bounding set (dropping
from it needs CAP_SETPCAP, which it drops too), no_new_privs (after which setuid bits and file
capabilities give nothing), the process's own sets, and the seccomp filter last (it needs
no_new_privs, and would refuse the prctl and capset calls before it).
"""

from __future__ import annotations

import errno
import os
import resource
from typing import TYPE_CHECKING

from pytest_minictr.container import seccomp
from pytest_minictr.host import linux
from pytest_minictr.host.linux import attempt

if TYPE_CHECKING:
    from pytest_minictr.spec import Security

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
# runc's default list less MKNOD (device nodes), NET_RAW (forged packets, a long CVE record),
# SYS_CHROOT (the chroot ".." escape needs it), SETPCAP, SETFCAP and AUDIT_WRITE (nothing a
# test does). What is left lets root inside own and chmod its files, switch to other ids,
# signal its own processes and bind low ports.
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID",
                        "SETUID", "NET_BIND_SERVICE")
_CAPABILITY_NUMBERS = {name: number for number, name in enumerate(CAPABILITY_NAMES)}

# resource.RLIMIT_* by the names of setrlimit(2) and `ulimit`
RLIMIT_NAMES = {name.lower()[len("RLIMIT_"):]: getattr(resource, name)
                for name in dir(resource) if name.startswith("RLIMIT_")}
UNLIMITED = resource.RLIM_INFINITY  # -1 to Python: never compare it as a number
# Core dumps off (a dump of a crashing test lands in the layer, or worse, in a host pipe
# handler named by core_pattern); descriptors bounded so that a leak fails fast instead of
# exhausting the host's file table. fsize: see confine().
DEFAULT_RLIMITS = {"core": (0, 0), "nofile": (1024, 4096)}


def capability_number(name: str) -> int:
    """'NET_RAW', 'net_raw' or 'CAP_NET_RAW' -> 13; KeyError for an unknown name."""
    key = name.upper()
    return _CAPABILITY_NUMBERS[key[len("CAP_"):] if key.startswith("CAP_") else key]


def limit_resources(security: "Security", layer_size: int) -> None:
    """The first steps, taken as host root: rlimits and a keyring of our own."""
    defaults = dict(DEFAULT_RLIMITS, fsize=(layer_size, layer_size))
    attempt("set rlimits", set_rlimits, {
        **{name: within_hard_limit(name, *pair) for name, pair in defaults.items()},
        **{name: (soft, hard) for name, soft, hard in security.rlimits}})
    # Joined while still host root: the keyring is owned by (and counted against the key
    # quota of) host root, out of the container's reach; seccomp closes keyctl anyway.
    attempt("join a new session keyring", linux.join_new_session_keyring)


def drop_privileges(security: "Security") -> None:
    """The last steps before the command: capabilities, then the seccomp filter. A failing
    step raises ContainerSetupError naming it."""
    kept = sum(1 << capability_number(name)
               for name in (*DEFAULT_CAPABILITIES, *security.capabilities))
    attempt("drop capabilities", drop_capabilities, kept)
    if security.seccomp:
        attempt("install the seccomp filter", linux.install_seccomp_filter,
                seccomp.host_filter(security.allow_syscalls))


def drop_capabilities(kept: int) -> None:
    """Bounding set first (the rest of the tree can never regain a capability), then
    no_new_privs, then our own sets; the ambient set emptied (nothing passes through exec
    to a program run by a non-root uid inside)."""
    drop_bounding_set(kept)
    linux.set_no_new_privs()
    linux.set_capabilities(effective=kept, permitted=kept, inheritable=0)
    linux.clear_ambient_capabilities()


def within_hard_limit(name: str, soft: int, hard: int) -> tuple[int, int]:
    """A default never raises a limit: without root, raising a hard limit is refused."""
    current = resource.getrlimit(RLIMIT_NAMES[name])[1]
    if current == UNLIMITED:
        return soft, hard
    return min(soft, current), min(hard, current)


def set_rlimits(limits: dict[str, tuple[int, int]]) -> None:
    for name, (soft, hard) in limits.items():
        try:
            resource.setrlimit(RLIMIT_NAMES[name], (soft, hard))
        except (OSError, ValueError) as error:  # Python says EPERM with a ValueError
            shown = tuple("unlimited" if v == UNLIMITED else v for v in (soft, hard))
            raise OSError(getattr(error, "errno", None) or errno.EPERM,
                          f"{name}={shown}: {getattr(error, 'strerror', None) or error} "
                          "(the kernel's ceiling, e.g. fs.nr_open for nofile, or a hard limit "
                          "raised without root)") from None


def enter_user_namespace(userns_fd: int) -> None:
    """Become root of the user namespace: the file ids, signals and keyrings of an unprivileged
    host uid from now on. Its capabilities hold only over namespaces it owns, and it owns none
    of ours (they were made from outside it), so mounts, hostname and network stay as built.
    setns alone keeps our host ids, which it does not map: setres[ug]id(0) takes its root's."""
    linux.setns(userns_fd, linux.CLONE_NEWUSER)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    linux.set_dumpable(False)  # an id change resets it; /proc/1 must stay closed (see launcher)


def drop_bounding_set(kept: int) -> None:
    """Drop every capability but `kept` from the bounding set, up to the kernel's last."""
    for number in range(64):
        if not kept & (1 << number):
            try:
                linux.drop_bounding_capability(number)
            except OSError as error:
                if error.errno == errno.EINVAL:  # past the last capability this kernel has
                    return
                raise
