"""What the command may still do once it runs: capabilities, no_new_privs, rlimits, keyring,
seccomp. Applied by the container's init as the last step before the command is spawned (the
command inherits it all through execve, and cannot undo any of it).

The order is the kernel's, and `plan.confine` follows it: rlimits first (raising a hard limit
needs CAP_SYS_RESOURCE, gone later; `set_rlimits`), the id switch into the container's user
namespace (entering one fills every set again, the bounding set too: `userns`), then
(`drop_capabilities`) the bounding set (dropping from it needs CAP_SETPCAP, which it drops
too), no_new_privs (after which setuid bits and file
capabilities give nothing), the process's own sets, the switch to `run_as`'s ids (leaving
uid 0 empties those sets: `switch_ids`), and the seccomp filter last (it needs no_new_privs,
and would refuse the prctl and capset calls before it).

The defaults live here too, with how a spec's choices combine with them (`rlimits_with`,
`capability_mask`): the launcher computes those into the plan's arguments (see `plan`).
"""

from __future__ import annotations

import errno
import functools
import os
import re
import resource
import socket
import stat

from pytest_minictr.confinement import CAPABILITY_NAMES, RLIMIT_NAMES, UNLIMITED, capability_name
from pytest_minictr.container import seccomp
from pytest_minictr.host import linux

# runc's default list less MKNOD (device nodes), NET_RAW (forged packets, a long CVE record),
# SYS_CHROOT (the chroot ".." escape needs it), SETPCAP, SETFCAP and AUDIT_WRITE (nothing a
# test does). What is left lets root inside own and chmod its files, switch to other ids,
# signal its own processes and bind low ports.
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID",
                        "SETUID", "NET_BIND_SERVICE")
_CAPABILITY_NUMBERS = {name: number for number, name in enumerate(CAPABILITY_NAMES)}

# Core dumps off (a dump of a crashing test lands in the layer, or worse, in a host pipe
# handler named by core_pattern); descriptors bounded so that a leak fails fast instead of
# exhausting the host's file table. fsize: see set_rlimits().
DEFAULT_RLIMITS = {"core": (0, 0), "nofile": (1024, 4096)}
_NAMESPACE_LINK = re.compile(r"(\w+):\[\d+\]")  # nsfs: "mnt:[4026531841]"
_KEPT_SOCKETS = (socket.AF_INET, socket.AF_INET6)


def capability_number(name: str) -> int:
    """'NET_RAW', 'net_raw' or 'CAP_NET_RAW' -> 13; KeyError for an unknown name."""
    return _CAPABILITY_NUMBERS[capability_name(name)]


@functools.lru_cache(maxsize=16)
def capability_mask(kept: tuple[str, ...]) -> int:
    """The default capabilities and `kept` (a spec's), as the mask drop_capabilities() keeps."""
    return sum(1 << capability_number(name)
               for name in dict.fromkeys((*DEFAULT_CAPABILITIES, *kept)))


def install_seccomp_filter(allowed: tuple[str, ...], _program_hex: str) -> None:
    """The default filter less `allowed` (built once by the launcher, inherited: see
    `seccomp`). Needs no_new_privs, which drop_capabilities() set. (The same program, in hex,
    is the native core's argument: Python's copy is ready-made, in memory.)"""
    linux.install_seccomp_filter(seccomp.host_filter(allowed))


def drop_capabilities(kept: int) -> None:
    """Bounding set first (the rest of the tree can never regain a capability), then
    no_new_privs, then our own sets; the ambient set emptied (nothing passes through exec
    to a program run by a non-root uid inside)."""
    drop_bounding_set(kept)
    linux.set_no_new_privs()
    linux.set_capabilities(effective=kept, permitted=kept, inheritable=0)
    linux.clear_ambient_capabilities()


def switch_ids(uid: int, gid: int) -> None:
    """Become `uid`:`gid`, with no supplementary groups (a rootfs of host binaries has no
    /etc/group to take them from). An id change resets the dumpable flag (to
    fs.suid_dumpable): cleared again, /proc/1 stays closed to the command."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    linux.set_dumpable(False)


def within_hard_limit(name: str, soft: int, hard: int) -> tuple[int, int]:
    """A default never raises a limit: without root, raising a hard limit is refused."""
    current = resource.getrlimit(RLIMIT_NAMES[name])[1]
    if current == UNLIMITED:
        return soft, hard
    return min(soft, current), min(hard, current)


def rlimits_with(chosen: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, int, int], ...]:
    """The defaults (never raising a hard limit: without root that is refused), then `chosen`
    (a spec's). fsize, the layer's size, is added by the step (only the child can measure it)."""
    limits = dict(_default_rlimits())
    limits.update((name, (soft, hard)) for name, soft, hard in chosen)
    return tuple((name, soft, hard) for name, (soft, hard) in limits.items())


@functools.cache
def _default_rlimits() -> dict[str, tuple[int, int]]:
    # once: our hard limits, which the children inherit, do not change
    return {name: within_hard_limit(name, *pair) for name, pair in DEFAULT_RLIMITS.items()}


def set_rlimits(limits: tuple[tuple[str, int, int], ...], layer_size: int) -> None:
    """`limits` over a default fsize of the writable layer's size (see rlimits_with)."""
    merged = {"fsize": within_hard_limit("fsize", layer_size, layer_size)}
    merged.update((name, (soft, hard)) for name, soft, hard in limits)
    for name, (soft, hard) in merged.items():
        try:
            resource.setrlimit(RLIMIT_NAMES[name], (soft, hard))
        except (OSError, ValueError) as error:  # Python says EPERM with a ValueError
            shown = tuple("unlimited" if v == UNLIMITED else v for v in (soft, hard))
            raise OSError(getattr(error, "errno", None) or errno.EPERM,
                          f"{name}={shown}: {getattr(error, 'strerror', None) or error} "
                          "(the kernel's ceiling, e.g. fs.nr_open for nofile, or a hard limit "
                          "raised without root)") from None


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


def close_inherited_handles(report_fd: int) -> None:
    """Close what the worker held that leads out of the sandbox: directories (an fd of a host
    directory is a way out of any root: CVE-2024-21626), unix and netlink sockets (the
    launcher's, which runs containers as host root, is one), namespaces and pidfds. Files,
    pipes, terminals and IP sockets stay: fixtures hand them to the body (the captured
    output is such a file)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != report_fd and _leads_out(fd):
            os.close(fd)


def _leads_out(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False  # the listing's own fd, closed since
    if stat.S_ISDIR(mode) or link == "anon_inode:[pidfd]":
        return True
    if stat.S_ISSOCK(mode):
        probe = socket.socket(fileno=os.dup(fd))
        try:
            return probe.family not in _KEPT_SOCKETS
        finally:
            probe.close()
    return bool(_NAMESPACE_LINK.fullmatch(link)) and not link.startswith("pipe:")
