"""The container's filesystem view, built inside its own mount namespace, ending in pivot_root.

Runs in the container's init process, before the command. What does not depend on the spec is
done by a spare ahead of need (`prepare`), the rest when the spec arrives:

1. `prepare_stage`: unshare(CLONE_NEWNS), make every mount private (systemd hosts mount `/`
   shared; without this each mount below would propagate back to the host), then mount a tmpfs
   "stage" over `/tmp`, *in this namespace only*. It holds the overlay's upper and work dirs
   and the mount point of the new root, so the writable layer lives in memory, is charged to
   the container's memory cgroup, and vanishes with the namespace: there is no host temp dir
   to leak.
2. `enter_stage`: pivot_root into the stage, the host's tree put under `/oldroot` (as
   bubblewrap does): every host path stays reachable there, the real `/tmp` included, which
   the stage covered before the pivot and no longer does.
3. `prepare_proc_and_dev`: `/proc` for the new PID namespace with the host kernel's knobs
   masked or read-only, and a minimal `/dev`, built in the stage and moved under the new root
   later (MS_MOVE takes the masks along).
4. `HostPaths.open` (the spec has come): O_PATH fds of the base rootfs, the kept layer and the
   bind sources, under `/oldroot`. They reach the kernel as `/proc/self/fd/N`, which spares
   us escaping ',' and ':' in overlay options. (They must be opened in this namespace: the
   kernel refuses to overlay or bind a mount of another one. So the copy of the host's mount
   table a spare made may not be stale: `HostMountWatch` tells, and a stale copy is made
   again.)
5. `build_root`: the base rootfs (never written: only a lower layer) under the writable layer,
   our `/dev`, a tmpfs `/tmp`, the user's mounts, our `/proc`. When container root is an
   unprivileged host uid (see `idmap`), the base is seen through an idmapped mount, so that
   what host root owns there, container root owns, and can write over in the layer.
6. `enter_root`: pivot_root, then the old root (stage and host) is detached, so no path leads
   back to the host (the chroot `..` escape has nothing to climb to).

Until the last pivot_root, paths are resolved against the stage, which holds the host's tree,
so a symlink inside the image (`/data -> /oldroot/var/lib/x`) would steer a mount point, or a
directory we create, onto the host: `_mount_point` refuses any symlink on the way to a target.
"""

from __future__ import annotations

import errno
import os
import select

from pytest_minictr.errors import ContainerSetupError
from pytest_minictr.host import linux
from pytest_minictr.host.idmap import UserNamespace
from pytest_minictr.host.linux import (MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC,
                                       MS_REMOUNT, MS_STATVFS_FLAGS, attempt)
from pytest_minictr.spec import ContainerSpec, Mount

STAGE = "/tmp"          # where the stage is mounted; once we pivot into it, our "/"
HOST = "/oldroot"        # the host's tree, in the stage
ROOT = "/newroot"        # the container's root, in the stage
PROC, DEV = "/proc", "/dev"  # built in the stage, then moved under ROOT
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
# runc's lists: what of /proc speaks of the host kernel rather than of our processes. Masked
# (an empty file or directory in its place): kernel memory and symbols, every user's keys,
# timers and scheduler state of other tasks, hardware. Read-only: the host kernel's knobs
# (core_pattern runs a program as host root: the classic escape), sysrq, interrupts, buses.
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "kallsyms", "latency_stats",
               "timer_stats", "acpi", "asound", "scsi")
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
_IDMAP_UNSUPPORTED = (errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP)


def prepare(unshare: bool = True) -> None:
    """Everything of the container's mounts that does not depend on its spec (see above).
    `unshare`: False if our mount namespace was made for us (the keeper's way)."""
    prepare_stage(unshare)
    enter_stage()
    prepare_proc_and_dev()


def prepare_stage(unshare: bool = True) -> None:
    """A mount namespace of our own, its mounts private, and the stage."""
    if unshare:
        attempt("unshare the mount namespace", linux.unshare, linux.CLONE_NEWNS)
    attempt("make mounts private", linux.mount, None, "/", None, MS_REC | linux.MS_PRIVATE)
    attempt(f"mount tmpfs stage on {STAGE}", linux.mount, "minictr", STAGE, "tmpfs",
            MS_NOSUID | MS_NODEV, "mode=0700")
    for name in ("upper", "work", ROOT, HOST, PROC, DEV):
        os.mkdir(f"{STAGE}/{name.lstrip('/')}", 0o755)


def enter_stage() -> None:
    os.chdir(STAGE)
    attempt("pivot_root into the stage", linux.pivot_root, ".", HOST.lstrip("/"))
    os.chdir("/")


def prepare_proc_and_dev() -> None:
    mount_proc()
    mount_dev()
    mask_proc()


def size_stage(layer_size: int | None) -> None:
    """`layer_size` bounds the stage, and with it the writable layer (a command filling it
    gets ENOSPC; the host's memory is spared)."""
    if layer_size is not None:
        attempt("size the writable layer", linux.mount, None, "/", None,
                MS_REMOUNT | MS_NOSUID | MS_NODEV, f"size={layer_size}")


class HostMountWatch:
    """The host's mount namespace, and whether its mount table changed since we copied it
    (a spare copies it before its spec comes; a mount made on the host meanwhile, say a
    filesystem on the rootfs' path, would be missing from the copy). Opened before the copy.

    poll() on a mountinfo file reports POLLPRI once the namespace it was opened in (the
    host's: the open took a reference) changed its mounts."""

    def __init__(self) -> None:
        self.namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.table = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)

    def changed(self) -> bool:
        poller = select.poll()
        poller.register(self.table, select.POLLPRI)
        return bool(poller.poll(0))

    def go_back(self) -> None:
        """Back into the host's mount namespace (and its root), leaving our copy behind."""
        attempt("rejoin the host's mount namespace", linux.setns, self.namespace,
                linux.CLONE_NEWNS)

    def close(self) -> None:
        os.close(self.namespace)
        os.close(self.table)


def build_root(spec: ContainerSpec, host_paths: "HostPaths", userns: UserNamespace | None,
               inside_user_namespace: bool) -> str:
    """Mount everything the container sees under a new root; return that root's path.
    `userns`: the user namespace its root will enter (see `idmap`), if any;
    `inside_user_namespace`: we are in one already (not root: the keeper's way)."""
    mount_overlay(host_paths.rootfs, host_paths.layer, userns, inside_user_namespace)
    attempt("move /dev", linux.mount, DEV, _mount_point("/dev", True), None, linux.MS_MOVE)
    # /tmp is writable too: the layer's bound holds for it as well
    tmp_size = "" if spec.layer_size is None else f",size={spec.layer_size}"
    attempt("mount /tmp", mount_tmpfs, _mount_point("/tmp", True), "mode=1777" + tmp_size)
    for mount, source_fd in zip(spec.mounts, host_paths.sources, strict=True):
        mount_user_mount(mount, source_fd)
    # last: until here, /proc/self/fd/N named our fds (the user's mounts use it)
    attempt("move /proc", linux.mount, PROC, _mount_point("/proc", True), None, linux.MS_MOVE)
    return ROOT


class HostPaths:
    """O_PATH fds of the host paths a spec names: rootfs, layer, and a source per mount."""

    def __init__(self, rootfs: int, layer: int | None, sources: list[int | None]):
        self.rootfs, self.layer, self.sources = rootfs, layer, sources

    @classmethod
    def open(cls, spec: ContainerSpec) -> "HostPaths":
        """Open what the spec names; ContainerSetupError names what failed. (Run by the init,
        which exits on a failure: what was opened before it goes with the process.)"""
        return cls(_open_host_path(spec.rootfs), _open_host_path(spec.layer),
                   [_open_host_path(m.source) for m in spec.mounts])

    def close(self) -> None:
        for fd in (self.rootfs, self.layer, *self.sources):
            if fd is not None:
                os.close(fd)


def _open_host_path(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return os.open(HOST + path, os.O_PATH | os.O_CLOEXEC)
    except OSError as error:
        raise ContainerSetupError(f"open {path}: {error.strerror}", f"open {path}",
                                  error.errno) from None


def mount_overlay(rootfs_fd: int, layer_fd: int | None, userns: UserNamespace | None,
                  inside_user_namespace: bool) -> None:
    """The base rootfs under a writable layer: the stage's tmpfs, or a kept host directory
    (`spec.layer`: successive containers of one test then see each other's writes)."""
    layer = layer_path(layer_fd)
    if layer_fd is not None:
        for name in ("upper", "work"):
            attempt(f"create the layer's {name} dir", os.makedirs, f"{layer}/{name}", 0o755, True)
    lower = rootfs_fd if userns is None else idmapped(rootfs_fd, userns)
    if userns is not None:
        # the upper dir's root is the container's "/": its root must own it to write there
        attempt("chown the layer", os.chown, f"{layer}/upper", userns.host_uid, userns.host_gid)
    options = f"lowerdir=/proc/self/fd/{lower},upperdir={layer}/upper,workdir={layer}/work"
    if inside_user_namespace:
        # trusted.* xattrs are out of reach in a user namespace (kernel >= 5.11 needs this)
        options += ",userxattr"
    attempt("mount overlay of the rootfs", linux.mount, "overlay", ROOT, "overlay",
            MS_NOSUID | MS_NODEV, options)


def layer_path(layer_fd: int | None) -> str:
    return "/" if layer_fd is None else f"/proc/self/fd/{layer_fd}"


def idmapped(rootfs_fd: int, userns: UserNamespace) -> int:
    """A detached view of the base whose host-root files read as container root's (the
    overlay keeps it alive); none needed for a base the mapped range owns already (our cache,
    see idmap). Where the kernel or the filesystem cannot idmap (before 5.12; tmpfs before
    6.3; NFS), the base stays as it is: readable, but its root-owned directories not writable
    inside."""
    if os.fstat(rootfs_fd).st_uid == userns.host_uid:
        return rootfs_fd
    try:
        return linux.open_idmapped_tree(rootfs_fd, userns.fd)
    except OSError as error:
        if error.errno in _IDMAP_UNSUPPORTED:
            return rootfs_fd
        raise ContainerSetupError(f"idmap the rootfs: {error.strerror}", "idmap the rootfs",
                                  error.errno) from None


def mount_proc() -> None:
    attempt("mount /proc", linux.mount, "proc", PROC, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mask_proc() -> None:
    """Mask PROC_MASKED (those this kernel has) with /dev/null or an empty read-only tmpfs;
    bind PROC_READ_ONLY read-only over themselves. Root inside cannot undo either: mounting
    needs CAP_SYS_ADMIN over our mount namespace, which it never has, and seccomp."""
    for name in PROC_MASKED:
        path = f"{PROC}/{name}"
        if os.path.isdir(path):
            attempt(f"mask /proc/{name}", mount_tmpfs, path, "size=0,mode=0555", MS_RDONLY)
        elif os.path.exists(path):
            attempt(f"mask /proc/{name}", linux.mount, f"{HOST}/dev/null", path, None, MS_BIND)
    for name in PROC_READ_ONLY:
        path = f"{PROC}/{name}"
        if os.path.exists(path):
            attempt(f"bind /proc/{name} read-only", bind_read_only, path)


def bind_read_only(path: str) -> None:
    linux.mount(path, path, None, MS_BIND | MS_REC)
    linux.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                | MS_NOEXEC)


def mount_dev() -> None:
    """A tmpfs /dev with only harmless nodes, bound from the host (mknod is not ours to use;
    nodev: a node made anyway would not open)."""
    attempt("mount /dev", linux.mount, "minictr-dev", DEV, "tmpfs",
            MS_NOSUID | MS_NOEXEC | MS_NODEV, "mode=0755,size=1m")
    for name in DEV_NODES:
        target = f"{DEV}/{name}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        attempt(f"bind /dev/{name}", linux.mount, f"{HOST}/dev/{name}", target, None, MS_BIND)
    for name, link in DEV_LINKS.items():
        os.symlink(link, f"{DEV}/{name}")
    os.mkdir(DEV + "/pts", 0o755)
    attempt("mount /dev/pts", linux.mount, "devpts", DEV + "/pts", "devpts",
            MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(DEV + "/shm", 0o1777)
    attempt("mount /dev/shm", mount_tmpfs, DEV + "/shm", "mode=1777,size=64m", MS_NOEXEC)


def mount_tmpfs(target: str, options: str, extra_flags: int = 0) -> None:
    linux.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | extra_flags, options)


def mount_user_mount(mount: Mount, source_fd: int | None) -> None:
    if source_fd is None:
        size = f",size={mount.size}" if mount.size else ""
        attempt(f"mount tmpfs on {mount.target}", mount_tmpfs,
                _mount_point(mount.target, True), "mode=1777" + size)
        return
    source = f"/proc/self/fd/{source_fd}"
    target = _mount_point(mount.target, os.path.isdir(source))
    attempt(f"bind {mount.source} on {mount.target}", linux.mount, source, target, None,
            MS_BIND | MS_REC)
    # a setuid binary or a device node planted through a bind must mean nothing here, nor on
    # the host; and read-only must hold for every mount under the bind too, not just its top
    extra = MS_NOSUID | MS_NODEV | (MS_RDONLY if mount.read_only else 0)
    attempt(f"restrict {mount.target}", restrict_mount_tree, target, extra)


def restrict_mount_tree(top: str, extra_flags: int) -> None:
    """Remount `top` and every mount below it with `extra_flags` added."""
    for target in [top, *_submounts(top)]:
        kept = _statvfs_mount_flags(target)
        linux.mount(None, target, None, MS_REMOUNT | MS_BIND | kept | extra_flags)


def _submounts(top: str) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4].replace("\\040", " ") for line in mountinfo]
    return [point for point in points if point.startswith(top + "/")]


def _statvfs_mount_flags(path: str) -> int:
    """The flags of the mount at `path`, which a remount must repeat: inside a user namespace
    the kernel refuses (EPERM) a remount that would drop a flag the outer namespace set."""
    flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in MS_STATVFS_FLAGS.items() if flags & st)


def enter_root(root: str) -> None:
    """pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    only the new root, with no directory needed to park the old one in."""
    os.chdir(root)
    attempt("pivot_root", linux.pivot_root, ".", ".")
    attempt("detach the old root", linux.umount2, ".", linux.MNT_DETACH)
    os.chdir("/")


def _mount_point(container_path: str, is_dir: bool) -> str:
    """The host-side path of a mount point inside the new root, created if missing (in the
    writable layer); no component may be a symlink (see the module's docstring)."""
    path = ROOT
    parts = [part for part in container_path.split("/") if part]
    for index, part in enumerate(parts):
        path = f"{path}/{part}"
        last = index == len(parts) - 1
        try:
            if os.path.islink(path):
                raise ContainerSetupError(
                    f"mount point {container_path}: /{'/'.join(parts[:index + 1])} is a "
                    "symlink in the rootfs; mount points must be real directories",
                    f"mount on {container_path}", errno.ELOOP)
            if not os.path.lexists(path):
                if last and not is_dir:
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
                else:
                    os.mkdir(path, 0o755)
        except OSError as error:
            raise ContainerSetupError(f"create mount point {container_path}: {error.strerror}",
                                      f"mount on {container_path}", error.errno) from None
    return path
