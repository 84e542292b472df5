"""The container's filesystem view, built inside its own mount namespace, ending in pivot_root.

Runs in the container's init process, after unshare(CLONE_NEWNS) and before the command. Order:

1. `make_mounts_private`: systemd hosts mount `/` shared; without this every mount below would
   propagate back to the host.
2. `prepare_stage`: a tmpfs over the host's `/tmp` *in this namespace only*. It holds the
   overlay's upper and work dirs and the mount point of the new root, so the writable layer
   lives in memory, is charged to the container's memory cgroup, and vanishes with the
   namespace: there is no host temp dir to leak. An fd of the host's `/tmp` taken before
   still reaches what the stage covers (the base rootfs or a bind source may live there).
   Host paths are opened as O_PATH fds and given to the kernel as `/proc/self/fd/N`, which
   also spares us escaping ',' and ':' in overlay options. Steps 1-2 depend on no spec, so
   a spare init does them ahead of need.
3. `mount_overlay`: base rootfs (never written: it is only a lower layer) + the writable layer.
4. `/proc` for the new PID namespace, a minimal `/dev`, a tmpfs `/tmp`, the user's mounts.
5. `enter_root`: pivot_root, then the old root is detached, so no path leads back to the host
   (the chroot `..` escape has nothing to climb to).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import linux
from .linux import attempt, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT
from .spec import ContainerSpec, Mount

STAGE = "/tmp"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}

# statvfs() reports mount flags with these bits; the kernel refuses (EPERM) a remount inside
# a user namespace that would drop a flag the outer namespace set, so we carry them over.
_LOCKED_STATVFS_FLAGS = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV,
                         os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048,
                         os.ST_RELATIME: 1 << 21}


@dataclass(frozen=True)
class Stage:
    """The tmpfs stage over /tmp, and the host's /tmp as it was before the stage covered it."""

    host_tmp: int   # O_PATH fd: lookups from it stay in the host's /tmp, under the stage

    def open_host_path(self, path: str) -> int:
        """An O_PATH fd of a host path (realpath'd by the spec), even one under /tmp."""
        relative = os.path.relpath(path, STAGE)
        if relative == "." or not relative.startswith(".."):
            return os.open(relative, os.O_PATH | os.O_CLOEXEC, dir_fd=self.host_tmp)
        return os.open(path, os.O_PATH | os.O_CLOEXEC)


def prepare_stage() -> Stage:
    """What every container needs before its spec is known: private mounts and the stage."""
    attempt("make mounts private", linux.mount, None, "/", None, MS_REC | linux.MS_PRIVATE)
    host_tmp = []
    attempt(f"open {STAGE}", lambda: host_tmp.append(
        os.open(STAGE, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)))
    attempt(f"mount tmpfs stage on {STAGE}", linux.mount, "minictr", STAGE, "tmpfs",
            MS_NOSUID | MS_NODEV, "mode=0700")
    for name in ("upper", "work", "root"):
        os.mkdir(f"{STAGE}/{name}", 0o755)
    return Stage(host_tmp[0])


def build_root(spec: ContainerSpec, stage: Stage) -> str:
    """Mount everything the container sees under a new root; return that root's path."""
    rootfs_fd = _open_host_path(stage, spec.rootfs)
    source_fds = {m.source: _open_host_path(stage, m.source)
                  for m in spec.mounts if m.source is not None}
    layer_fd = None if spec.layer is None else _open_host_path(stage, spec.layer)
    root = mount_overlay(rootfs_fd, layer_fd, spec.user_namespace)
    mount_proc(root)
    mount_dev(root)
    attempt("mount /tmp", mount_tmpfs, root + "/tmp", "mode=1777")
    for mount in spec.mounts:
        mount_user_mount(root, mount, source_fds)
    for fd in (stage.host_tmp, rootfs_fd, *source_fds.values()):
        os.close(fd)
    return root


def mount_overlay(rootfs_fd: int, layer_fd: int | None, in_user_namespace: bool) -> str:
    """The base rootfs under a writable layer: the stage's tmpfs, or a kept host directory
    (`spec.layer`: successive containers of one test then see each other's writes)."""
    layer = STAGE if layer_fd is None else f"/proc/self/fd/{layer_fd}"
    if layer_fd is not None:
        for name in ("upper", "work"):
            attempt(f"create the layer's {name} dir", os.makedirs, f"{layer}/{name}", 0o755, True)
    options = f"lowerdir=/proc/self/fd/{rootfs_fd},upperdir={layer}/upper,workdir={layer}/work"
    if in_user_namespace:
        # trusted.* xattrs are out of reach in a user namespace (kernel >= 5.11 needs this)
        options += ",userxattr"
    attempt("mount overlay of the rootfs", linux.mount, "overlay", f"{STAGE}/root", "overlay",
            MS_NOSUID, options)
    if layer_fd is not None:
        os.close(layer_fd)  # the mount holds the directory now
    return f"{STAGE}/root"


def mount_proc(root: str) -> None:
    target = _ensure_dir(root + "/proc")
    attempt("mount /proc", linux.mount, "proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount_dev(root: str) -> None:
    """A tmpfs /dev with only harmless nodes, bound from the host (mknod is not ours to use)."""
    dev = _ensure_dir(root + "/dev")
    attempt("mount /dev", linux.mount, "minictr-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC,
          "mode=0755,size=1m")
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
    linux.mount("tmpfs", _ensure_dir(target), "tmpfs", MS_NOSUID | MS_NODEV | extra_flags, options)


def mount_user_mount(root: str, mount: Mount, source_fds: dict[str, int]) -> None:
    target = root + mount.target
    if mount.source is None:
        size = f",size={mount.size}" if mount.size else ""
        attempt(f"mount tmpfs on {mount.target}", mount_tmpfs, target, "mode=1777" + size)
        return
    fd = source_fds[mount.source]
    _ensure_mount_point(target, os.path.isdir(f"/proc/self/fd/{fd}"))
    attempt(f"bind {mount.source} on {mount.target}", linux.mount, f"/proc/self/fd/{fd}", target,
          None, MS_BIND | MS_REC)
    if mount.read_only:
        attempt(f"make {mount.target} read-only", remount_read_only, target)


def remount_read_only(target: str) -> None:
    flags = os.statvfs(target).f_flag
    kept = sum(ms for st, ms in _LOCKED_STATVFS_FLAGS.items() if flags & st)
    linux.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def enter_root(root: str) -> None:
    """pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    only the new root, with no directory needed to park the old one in."""
    os.chdir(root)
    attempt("pivot_root", linux.pivot_root, ".", ".")
    attempt("detach the old root", linux.umount2, ".", linux.MNT_DETACH)
    os.chdir("/")


def _open_host_path(stage: Stage, path: str) -> int:
    fds = []
    attempt(f"open {path}", lambda: fds.append(stage.open_host_path(path)))
    return fds[0]


def _ensure_dir(path: str) -> str:
    if not os.path.isdir(path):
        attempt(f"create {path}", os.makedirs, path, 0o755, True)
    return path


def _ensure_mount_point(path: str, is_dir: bool) -> None:
    if is_dir:
        _ensure_dir(path)
    elif not os.path.exists(path):
        _ensure_dir(os.path.dirname(path))
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
