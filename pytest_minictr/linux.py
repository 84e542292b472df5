"""Linux syscalls that Python's `os` module lacks, bound once with ctypes, and their constants.

Everything kernel-specific that is not in the standard library lives here, so that the rest of
the code reads as a sequence of named steps. One ctypes path for every Python version: the
3.12-only `os.unshare` would be a second path that these machines could never test.
Each wrapper raises `OSError` with the errno and the path involved, like `os` functions do.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from .errors import ContainerSetupError

# clone(2) / unshare(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2
# statvfs() reports a mount's flags with ST_* bits; the MS_* flag each one stands for
MS_STATVFS_FLAGS = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV,
                    os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME,
                    os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4

# ioctl on a socket, struct ifreq: 16-byte name then a short of flags
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# glibc has no wrapper for pivot_root, so it goes through syscall(2) by number.
_SYSCALL_NUMBERS = {
    "x86_64": {"pivot_root": 155},
    "aarch64": {"pivot_root": 41},
    "riscv64": {"pivot_root": 41},
    "ppc64le": {"pivot_root": 203},
    "s390x": {"pivot_root": 217},
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, *paths: str | None) -> None:
    if result < 0:
        err = ctypes.get_errno()
        names = [p for p in paths if p]
        raise OSError(err, os.strerror(err), *names[:2])


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype))


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), source, target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _syscall_number("pivot_root")
    _check(_libc.syscall(ctypes.c_long(number), _b(new_root), _b(put_old)), new_root)


def set_parent_death_signal(signum: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0))


def set_dumpable(dumpable: bool) -> None:
    _check(_libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0))


def _syscall_number(name: str) -> int:
    try:
        return _SYSCALL_NUMBERS[os.uname().machine][name]
    except KeyError:
        raise OSError(f"{name}: syscall number unknown on {os.uname().machine}") from None


def set_link_up(name: str) -> None:
    """Bring a network interface up in the current network namespace (`ip link set up`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))


def attempt(step: str, function, *args) -> None:
    """Run one setup step in a container's child; an OSError becomes a ContainerSetupError
    that names the step, to be sent back to the caller."""
    try:
        function(*args)
    except OSError as error:
        raise ContainerSetupError(f"{step}: {error.strerror or error}", step,
                                  error.errno) from None
