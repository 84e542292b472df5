"""Container root's user namespace, from the inside: entering the launcher's (as root, the last
step before the confinement), or making one and having its ids mapped (without root, the first
step, in the keeper).

See `host.idmap` for who container root is on the host and how the launcher makes the
namespace its containers share.
"""

from __future__ import annotations

import os

from pytest_minictr.container import init
from pytest_minictr.container.failure import exit_reporting, write_line
from pytest_minictr.errors import ContainerSetupError
from pytest_minictr.host import linux


def enter_user_namespace(userns_fd: int) -> None:
    """Become root of the user namespace: the file ids, signals and keyrings of an unprivileged
    host uid from now on. Its capabilities hold only over namespaces it owns, and it owns none
    of ours (they were made from outside it), so mounts, hostname and network stay as built.
    setns alone keeps our host ids, which it does not map: setres[ug]id(0) takes its root's."""
    linux.setns(userns_fd, linux.CLONE_NEWUSER)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    linux.set_dumpable(False)  # an id change resets it; /proc/1 must stay closed (see plan)


def map_own_ids(uid: int, gid: int) -> None:
    """Map container root to our own ids, from inside the new namespace. A single-id map is
    all the kernel lets a process write for itself, and a gid map needs setgroups denied
    first (CVE-2014-8989)."""
    linux.write_file("/proc/self/setgroups", "deny")
    linux.write_file("/proc/self/uid_map", f"0 {uid} 1\n")
    linux.write_file("/proc/self/gid_map", f"0 {gid} 1\n")


def wait_for_id_maps(ready: int, go: int) -> None:
    """Have the launcher map our namespace in full (newuidmap: only a process outside may),
    and wait until it has."""
    os.write(ready, b"1")
    if os.read(go, 1) != b"1":
        raise ContainerSetupError("the launcher could not map the container's ids",
                                  "write uid/gid maps")
    os.close(ready)
    os.close(go)


def fork_init_under_keeper(fds: init.ChildFds) -> int:
    """Fork the container's init, PID 1 of the namespace just unshared; the child returns its
    parent's pidfd (and carries out the rest of the plan), this process stays as the keeper:
    outside the PID namespace, it holds the namespaces, reports the init's pid and, once the
    init is gone, its wait status."""
    keeper_pidfd = os.pidfd_open(os.getpid())
    init_pid = os.fork()
    if init_pid == 0:
        init.die_with_parent(keeper_pidfd, fds.all())
        return keeper_pidfd
    exit_reporting(fds.setup, keep_init, init_pid, keeper_pidfd, fds)


def keep_init(init_pid: int, keeper_pidfd: int, fds: init.ChildFds) -> None:
    write_line(fds.setup, {"pid": init_pid})
    for fd in (*fds.stdio(), fds.setup, keeper_pidfd):
        os.close(fd)
    _, wait_status = os.waitpid(init_pid, 0)
    write_line(fds.status, {"init": wait_status})
