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
import select
import signal
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

# clone(2) / unshare(2) flags
CLONE_PARENT = 0x00008000
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
MS_MOVE = 8192
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
PR_SET_NAME = 15
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# detached mounts and idmapping (open_tree(2), mount_setattr(2))
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_IDMAP = 0x00100000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
CLOSE_RANGE_CLOEXEC = 4
KEYCTL_JOIN_SESSION_KEYRING = 1

# ioctl on a pty's master (asm-generic numbers: x86_64 and aarch64 alike)
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): lock or unlock the slave
TIOCGPTPEER = 0x5441     # _IO('T', 0x41), Linux 4.13: open the slave with no path lookup

# ioctl on a socket, struct ifreq: 16-byte name then a short of flags
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
IFF_UP = 0x1

# glibc has no wrapper for pivot_root, so it goes through syscall(2) by number.
# The calls added since 5.x share one number on every architecture.
_NEW_CALLS = {"open_tree": 428, "close_range": 436, "mount_setattr": 442}
_SYSCALL_NUMBERS = {
    "x86_64": {"recvmsg": 47, "pivot_root": 155, "keyctl": 250, "clone": 56, **_NEW_CALLS},
    "aarch64": {"recvmsg": 212, "pivot_root": 41, "keyctl": 219, "clone": 220, **_NEW_CALLS},
    "riscv64": {"recvmsg": 212, "pivot_root": 41, "keyctl": 219, "clone": 220, **_NEW_CALLS},
    "ppc64le": {"recvmsg": 342, "pivot_root": 203, "keyctl": 271, "clone": 120, **_NEW_CALLS},
    # s390x: no "clone" (its clone takes the first two arguments swapped)
    "s390x": {"recvmsg": 372, "pivot_root": 217, "keyctl": 280, **_NEW_CALLS},
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
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
# The same C library, called with the GIL held (PyDLL): for clone(2), whose child must wake up
# holding the GIL that the interpreter thinks it holds.
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.syscall.restype = ctypes.c_long


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
    _check(_syscall("pivot_root", _b(new_root), _b(put_old)), new_root)


def set_parent_death_signal(signum: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0))


def arm_parent_death_signal(parent_pidfd: int) -> bool:
    """SIGKILL us when our parent dies (PR_SET_PDEATHSIG); False if it died before that was
    armed, as its pidfd tells (getppid() says 0 for any parent outside our PID namespace)."""
    set_parent_death_signal(signal.SIGKILL)
    return not select.select([parent_pidfd], [], [], 0)[0]


def close_each(fds: Iterable[int | None]) -> None:
    """Close each descriptor that is there (None: one never made), each once."""
    for fd in {fd for fd in fds if fd is not None}:
        os.close(fd)


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every descriptor from 3 up but `keep` (close_range(2) under the hood)."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 0x7FFFFFFF)


def set_process_name(name: str) -> None:
    """What ps shows as the process's command (/proc/PID/comm: 15 bytes at most)."""
    buffer = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(PR_SET_NAME, ctypes.addressof(buffer), 0, 0, 0))


def set_dumpable(dumpable: bool) -> None:
    _check(_libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0))


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def drop_bounding_capability(capability: int) -> None:
    _check(_libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0))


def clear_ambient_capabilities() -> None:
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))


def set_capabilities(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of this process, version 3: two 32-bit words per set."""
    header = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = b"".join(struct.pack("=III", (effective >> shift) & 0xFFFFFFFF,
                                (permitted >> shift) & 0xFFFFFFFF,
                                (inheritable >> shift) & 0xFFFFFFFF) for shift in (0, 32))
    _check(_libc.capset(header, data))


class SeccompProgram:
    """A BPF program ready for PR_SET_SECCOMP: its struct sock_fprog, made once (a forked init
    then makes a single call, touching as few of its parent's pages as it can)."""

    def __init__(self, program: bytes):
        self._instructions = ctypes.create_string_buffer(program, len(program))
        self._fprog = ctypes.create_string_buffer(
            struct.pack("@HP", len(program) // 8, ctypes.addressof(self._instructions)))
        self.address = ctypes.addressof(self._fprog)


def install_seccomp_filter(program: SeccompProgram) -> None:
    """Needs no_new_privs (or CAP_SYS_ADMIN)."""
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, program.address, 0, 0))


def join_new_session_keyring() -> None:
    """An anonymous session keyring of our own, in place of the one inherited from the host."""
    _check(_syscall("keyctl", KEYCTL_JOIN_SESSION_KEYRING, None))


def mark_fds_close_on_exec(first: int) -> None:
    """close_range(first, ~0, CLOSE_RANGE_CLOEXEC): nothing from `first` up survives exec."""
    _check(_syscall("close_range", first, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC))


def open_pty() -> tuple[int, int]:
    """A new pseudo-terminal of the devpts instance our /dev/ptmx leads to: (master, slave),
    close-on-exec. The slave is opened through the master (TIOCGPTPEER), not by its path,
    which another process of that devpts could have replaced meanwhile."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        return master, fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise


def open_idmapped_tree(path_fd: int, userns_fd: int) -> int:
    """A detached copy of the mount tree at `path_fd` whose file owners read through the id
    map of `userns_fd` (kernel >= 5.12, and a filesystem that allows it). Returns its fd."""
    tree = _syscall("open_tree", path_fd, b"", OPEN_TREE_CLONE | AT_RECURSIVE | AT_EMPTY_PATH
                    | os.O_CLOEXEC)
    _check(tree)
    attr = struct.pack("=QQQQ", MOUNT_ATTR_IDMAP, 0, 0, userns_fd)  # struct mount_attr
    result = _syscall("mount_setattr", tree, b"", AT_EMPTY_PATH,
                      ctypes.create_string_buffer(attr, len(attr)), len(attr))
    if result < 0:
        err = ctypes.get_errno()
        os.close(tree)
        raise OSError(err, os.strerror(err))
    return tree


def set_tree_attributes(path: str, attributes: int) -> None:
    """Add mount `attributes` (MOUNT_ATTR_*) to the mount at `path` and every mount below it,
    in one call (kernel >= 5.12): a remount per submount costs a walk of the mount table."""
    # struct mount_attr: attributes to set, to clear, propagation, userns fd
    attr = struct.pack("=QQQQ", attributes, 0, 0, 0)
    result = _syscall("mount_setattr", -100, os.fsencode(path), AT_RECURSIVE,  # AT_FDCWD
                      ctypes.create_string_buffer(attr, len(attr)), len(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def waits_in(pid: int, name: str) -> bool:
    """Whether `pid` is blocked in the system call `name` now (/proc/PID/syscall: its
    number first; "running" when it is not in one)."""
    return read_file(f"/proc/{pid}/syscall").split(" ", 1)[0] == str(_syscall_number(name))


def _syscall(name: str, *args: Any) -> int:
    result: int = _libc.syscall(ctypes.c_long(_syscall_number(name)),
                                *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return result


def _syscall_number(name: str) -> int:
    try:
        return _SYSCALL_NUMBERS[os.uname().machine][name]
    except KeyError:
        raise OSError(f"{name}: syscall number unknown on {os.uname().machine}") from None


def fork_as_sibling() -> int:
    """fork(), except that the child's parent is our parent (CLONE_PARENT): it reaps the
    child, gets its exit status and is the parent its PR_SET_PDEATHSIG watches. Returns 0 in
    the child, its pid here. Python's own fork steps run around it, as os.fork() runs them
    (import lock, at-fork hooks, the child's thread state). Only for a single-threaded
    caller whose child never calls raise(3) or pthread functions: glibc's cached thread id is
    not updated in the child (os.fork's clone asks the kernel to write it; a raw clone cannot
    name that field portably), everything else is as after fork()."""
    number = ctypes.c_long(_syscall_number("clone"))
    flags = ctypes.c_long(CLONE_PARENT | signal.SIGCHLD)  # SIGCHLD: waitpid() sees it
    ctypes.pythonapi.PyOS_BeforeFork()
    # no new stack (the child runs on a copy of ours, like fork); no tid pointers, no TLS
    pid: int = _libc_gil.syscall(number, flags, *[ctypes.c_long(0)] * 4)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid


def fork_into_new_pid_namespace(own_pid_namespace: int,
                                fork: Callable[[], int] = os.fork) -> int:
    """`fork()` a child that is PID 1 of a new PID namespace; we stay in ours. unshare(2)
    moves our next child, not us, into the new namespace; setns(2) on `own_pid_namespace`
    takes us back for the one after (in the parent only: the child's children belong in its
    namespace)."""
    unshare(CLONE_NEWPID)
    try:
        pid = fork()
    except BaseException:
        setns(own_pid_namespace, CLONE_NEWPID)
        raise
    if pid != 0:
        setns(own_pid_namespace, CLONE_NEWPID)
    return pid


def write_file(path: str, text: str) -> None:
    """One write(2) to a /proc, /sys or cgroupfs file, which parses each write as a whole and
    fails it as a whole (with the kernel's errno at write time, which buffered file objects
    would hide). Without Python's file objects, which cost more than the write (and, in a
    freshly forked child, copied pages)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_file(path: str) -> str:
    """A small file's text by read(2), without Python's file objects (see write_file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="surrogateescape")


def take_loopback_down() -> None:
    """Undo set_link_up("lo") in a new network namespace: down, and without the 127.0.0.1 its
    coming up gave it (down alone leaves the address routed to a dead device: a connect
    there hangs instead of failing). ::1 goes with the down. As the namespace was made.
    (IPv4 has no SIOCDIFADDR: setting 0.0.0.0 is how an address is removed by ioctl.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_link_flag(sock, "lo", up=False)
        no_address = struct.pack("=H14x", socket.AF_INET)
        fcntl.ioctl(sock, SIOCSIFADDR, struct.pack("16s16s8x", b"lo", no_address))


def set_link_up(name: str) -> None:
    """Bring a network interface up in the current network namespace (`ip link set up`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_link_flag(sock, name, up=True)


def _set_link_flag(sock: socket.socket, name: str, up: bool) -> None:
    request = struct.pack("16sH14x", name.encode(), 0)
    flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
    flags = flags | IFF_UP if up else flags & ~IFF_UP
    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags))
