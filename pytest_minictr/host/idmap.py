"""Who container root is on the host: the user namespace a root launcher puts its containers in.

Root inside must not be root outside: a process that breaks out of every other layer (a kernel
bug in a mount, a leaked fd) should find itself an unprivileged uid of the host, with no
capability over anything the host owns. So a root launcher makes one user namespace, mapping
container ids 0-65535 to a range of host ids that nobody uses, and each container's init enters
it as the very last step of its setup, after building the mounts and the network as host root
(the namespaces it built stay owned by the host, so root inside cannot remount, unmount or
reconfigure any of them, whatever capabilities it keeps).

Root inside must also own the base rootfs, or it could not write over /etc (in its layer): host
root's files are nobody's in the namespace. Two ways, both used: the launcher shows the base
through an idmapped mount (kernel >= 5.12, and a filesystem that allows it: ext4, xfs, btrfs;
tmpfs from 6.3), and the rootfs cache, built by root, is owned by the mapped range from the
start (`shift_ownership`), so that it needs no idmap on any kernel or filesystem.

The range is root's in /etc/subuid and /etc/subgid when there is one (the administrator's
word on which ids are free), else DEFAULT_RANGE: far above the ranges useradd hands out.
All containers of all launchers share the range, as with Docker's userns-remap: they cannot
reach each other anyway (PID, IPC, network and mount namespaces apart).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from dataclasses import dataclass

from pytest_minictr.host import linux

MAPPED_IDS = 65536                       # container ids 0..65535; 65534 is "nobody"
DEFAULT_RANGE = 1_000_000_000            # useradd's SUB_UID_MAX is 600,100,000 by default


@dataclass(frozen=True)
class UserNamespace:
    """An open user namespace and the host ids its root has."""

    fd: int
    host_uid: int
    host_gid: int


def id_range(name: str, user: str = "root") -> int:
    """The first id of `user`'s range in /etc/sub{u,g}id (`name`), if it has one of at least
    MAPPED_IDS ids; DEFAULT_RANGE otherwise."""
    start = subordinate_range(read_text(f"/etc/{name}"), user)
    return DEFAULT_RANGE if start is None else start


def subordinate_range(entries: str | None, *owners: str) -> int | None:
    """The start of the first range of at least MAPPED_IDS ids that /etc/subuid-style
    `entries` give one of `owners` (a name or a uid), if any."""
    for line in (entries or "").splitlines():
        owner, _, rest = line.strip().partition(":")
        start, _, count = rest.partition(":")
        if owner in owners and start.isdigit() and count.isdigit() \
                and int(count) >= MAPPED_IDS:
            return int(start)
    return None


def subordinate_ids(user: str, subuid: str | None, subgid: str | None,
                    uid: int | None = None) -> tuple[int, int] | None:
    """(uid start, gid start) of `user`'s subordinate ranges, if both exist."""
    owners = (user,) if uid is None else (user, str(uid))
    uid_start, gid_start = subordinate_range(subuid, *owners), subordinate_range(subgid, *owners)
    return None if uid_start is None or gid_start is None else (uid_start, gid_start)


def read_text(path: str) -> str | None:
    """The file's text; None if it cannot be read (absent: no subordinate ids there)."""
    try:
        return linux.read_file(path)
    except OSError:
        return None


def map_with_helpers(pid: int, uid: int, gid: int, starts: tuple[int, int]) -> None:
    """Map the user namespace of `pid` in full, from outside it, through the setuid helpers
    of shadow-utils: container root to our ids, container ids 1-65535 to our subordinate
    ranges (what /etc/subuid and /etc/subgid grant us). OSError with the helper's words."""
    for helper, own, start in (("newuidmap", uid, starts[0]), ("newgidmap", gid, starts[1])):
        done = subprocess.run([helper, str(pid), "0", str(own), "1", "1", str(start),
                               str(MAPPED_IDS - 1)], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{helper} failed: {done.stderr.strip() or done.returncode}")


def shift_ownership(tree: str) -> None:
    """Give every file of `tree` to the mapped range: host id n becomes the range's n (so
    root's files become container root's), without following symlinks. A file hard-linked
    to a host file (the builder links what it can) keeps its owner: a chown would change the
    host's file; the idmapped mount covers it where the kernel has them."""
    uid_base, gid_base = id_range("subuid"), id_range("subgid")
    for directory, subdirs, files in os.walk(tree):
        for name in (directory, *(os.path.join(directory, n) for n in subdirs + files)):
            st = os.lstat(name)
            if st.st_nlink > 1 and not os.path.isdir(name):
                continue
            if st.st_uid < MAPPED_IDS and st.st_gid < MAPPED_IDS:
                os.lchown(name, uid_base + st.st_uid, gid_base + st.st_gid)


def make_user_namespace() -> UserNamespace:
    """A mapped user namespace held by an fd (close-on-exec). A namespace can only be made by
    a process entering it, so a child makes it and waits while we write its maps (as host root,
    the full range at once), then goes; the fd keeps the namespace alive."""
    uid, gid = id_range("subuid"), id_range("subgid")
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(ready_w, b"ok")
            signal.pause()
        except OSError as error:
            os.write(ready_w, str(error.errno).encode())
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        answer = os.read(ready_r, 16)
        if answer != b"ok":
            number = int(answer or errno.EIO)
            raise OSError(number, f"unshare(CLONE_NEWUSER): {os.strerror(number)}")
        for name, start in (("uid_map", uid), ("gid_map", gid)):
            linux.write_file(f"/proc/{pid}/{name}", f"0 {start} {MAPPED_IDS}\n")
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return UserNamespace(fd, uid, gid)
