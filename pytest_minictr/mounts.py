"""The container's filesystem view, built inside its own mount namespace, ending in pivot_root.

Runs in the container's init process, right after unshare(CLONE_NEWNS) (taken when the spec
arrives, so that our copy of the host's mount table is current), before the command:

1. `HostPaths.open`: O_PATH fds of the base rootfs, the kept layer and the bind sources. They
   reach the kernel as `/proc/self/fd/N`: that still works once the stage covers `/tmp` (where
   they may live), and spares us escaping ',' and ':' in overlay options. (They must be opened
   here: the kernel refuses to overlay or bind a mount of another mount namespace.)
2. `prepare_stage`: make every mount private (systemd hosts mount `/` shared; without this each
   mount below would propagate back to the host), then mount a tmpfs "stage" over `/tmp`, *in
   this namespace only*. It holds the overlay's upper and work dirs and the mount point of the
   new root, so the writable layer lives in memory, is charged to the container's memory
   cgroup, and vanishes with the namespace: there is no host temp dir to leak.
3. `build_root`: the base rootfs (never written: only a lower layer) under the writable layer,
   then `/proc` for the new PID namespace with the host kernel's knobs masked or read-only, a
   minimal `/dev`, a tmpfs `/tmp`, the user's mounts. When container root is an unprivileged
   host uid (see `idmap`), the base is seen through an idmapped mount, so that what host root
   owns there, container root owns, and can write over in the layer.
4. `enter_root`: pivot_root, then the old root is detached, so no path leads back to the host
   (the chroot `..` escape has nothing to climb to).

Until pivot_root, paths are resolved against the host's root, so a symlink inside the image
(`/data -> /var/lib/x`) would steer a mount point, or a directory we create, onto the host:
`_mount_point` refuses any symlink on the way to a target.
"""

from __future__ import annotations

import errno
import os

from . import linux
from .linux import (MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT,
                    MS_STATVFS_FLAGS, attempt)
from .errors import ContainerSetupError
from .idmap import UserNamespace
from .spec import ContainerSpec, Mount

STAGE = "/tmp"
ROOT = f"{STAGE}/root"
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


def prepare_stage(layer_size: int | None = None) -> None:
    """Private mounts and the stage; `layer_size` bounds the stage, and with it the writable
    layer (a command filling it gets ENOSPC; the host's memory is spared)."""
    attempt("make mounts private", linux.mount, None, "/", None, MS_REC | linux.MS_PRIVATE)
    size = "" if layer_size is None else f",size={layer_size}"
    attempt(f"mount tmpfs stage on {STAGE}", linux.mount, "minictr", STAGE, "tmpfs",
            MS_NOSUID | MS_NODEV, "mode=0700" + size)
    for name in ("upper", "work", "root"):
        os.mkdir(f"{STAGE}/{name}", 0o755)


def build_root(spec: ContainerSpec, host_paths: "HostPaths", userns: UserNamespace | None,
               inside_user_namespace: bool) -> str:
    """Mount everything the container sees under a new root; return that root's path.
    `userns`: the user namespace its root will enter (see `idmap`), if any;
    `inside_user_namespace`: we are in one already (not root: the keeper's way)."""
    mount_overlay(host_paths.rootfs, host_paths.layer, userns, inside_user_namespace)
    mount_proc()
    mount_dev()
    mask_proc()
    # /tmp is writable too: the layer's bound holds for it as well
    tmp_size = "" if spec.layer_size is None else f",size={spec.layer_size}"
    attempt("mount /tmp", mount_tmpfs, _mount_point("/tmp", True), "mode=1777" + tmp_size)
    for mount, source_fd in zip(spec.mounts, host_paths.sources, strict=True):
        mount_user_mount(mount, source_fd)
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
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
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
    return STAGE if layer_fd is None else f"/proc/self/fd/{layer_fd}"


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
    attempt("mount /proc", linux.mount, "proc", _mount_point("/proc", True), "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mask_proc() -> None:
    """Mask PROC_MASKED (those this kernel has) with /dev/null or an empty read-only tmpfs;
    bind PROC_READ_ONLY read-only over themselves. Root inside cannot undo either: mounting
    needs CAP_SYS_ADMIN over our mount namespace, which it never has, and seccomp."""
    proc = f"{ROOT}/proc"
    for name in PROC_MASKED:
        path = f"{proc}/{name}"
        if os.path.isdir(path):
            attempt(f"mask /proc/{name}", mount_tmpfs, path, "size=0,mode=0555", MS_RDONLY)
        elif os.path.exists(path):
            attempt(f"mask /proc/{name}", linux.mount, f"{ROOT}/dev/null", path, None, MS_BIND)
    for name in PROC_READ_ONLY:
        path = f"{proc}/{name}"
        if os.path.exists(path):
            attempt(f"bind /proc/{name} read-only", bind_read_only, path)


def bind_read_only(path: str) -> None:
    linux.mount(path, path, None, MS_BIND | MS_REC)
    linux.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                | MS_NOEXEC)


def mount_dev() -> None:
    """A tmpfs /dev with only harmless nodes, bound from the host (mknod is not ours to use;
    nodev: a node made anyway would not open)."""
    dev = _mount_point("/dev", True)
    attempt("mount /dev", linux.mount, "minictr-dev", dev, "tmpfs",
            MS_NOSUID | MS_NOEXEC | MS_NODEV, "mode=0755,size=1m")
    for name in DEV_NODES:
        target = f"{dev}/{name}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        attempt(f"bind /dev/{name}", linux.mount, f"/dev/{name}", target, None, MS_BIND)
    for name, link in DEV_LINKS.items():
        os.symlink(link, f"{dev}/{name}")
    os.mkdir(dev + "/pts", 0o755)
    attempt("mount /dev/pts", linux.mount, "devpts", dev + "/pts", "devpts",
            MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(dev + "/shm", 0o1777)
    attempt("mount /dev/shm", mount_tmpfs, dev + "/shm", "mode=1777,size=64m", MS_NOEXEC)


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
