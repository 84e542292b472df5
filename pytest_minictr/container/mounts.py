"""The container's filesystem view, built inside its own mount namespace, ending in pivot_root.

Runs in the container's init process, before the command, as steps of its setup plan (see
`plan`, which gives their order). What does not depend on the spec is done by a spare ahead of
need, the rest when the spec arrives:

1. `make_mounts_private`, `mount_stage` (in a new mount namespace): every mount private
   (systemd hosts mount `/` shared; without this each mount below would propagate back to the
   host), then mount a tmpfs "stage" over `/tmp`, *in this namespace only*. It holds the
   overlay's upper and work dirs and the mount point of the new root, so the writable layer
   lives in memory, is charged to the container's memory cgroup, and vanishes with the
   namespace: there is no host temp dir to leak.
2. `enter_stage`: pivot_root into the stage, the host's tree put under `/oldroot` (as
   bubblewrap does): every host path stays reachable there, the real `/tmp` included, which
   the stage covered before the pivot and no longer does.
3. `mount_proc`, `mount_dev`, `mask_proc`: `/proc` for the new PID namespace with the host
   kernel's knobs masked or read-only, and a minimal `/dev`, built in the stage and moved under
   the new root later (MS_MOVE takes the masks along).
4. `open_host_path` (the spec has come): O_PATH fds of the base rootfs, the kept layer and the
   bind sources, under `/oldroot`. They reach the kernel as `/proc/self/fd/N`, which spares
   us escaping ',' and ':' in overlay options. (They must be opened in this namespace: the
   kernel refuses to overlay or bind a mount of another one. So the copy of the host's mount
   table a spare made may not be stale: `HostMountWatch` tells, and a stale copy is made
   again.)
5. `mount_overlay`, `move_into_root`, `mount_tmp`, the user's mounts: the base rootfs (never
   written: only a lower layer) under the writable layer, our `/dev`, a tmpfs `/tmp`, the
   user's mounts, our `/proc`. When container root is an unprivileged host uid (see
   `host.idmap`), the base is seen through an idmapped mount, so that what host root owns
   there, container root owns, and can write over in the layer.
6. `enter_root`: pivot_root, then the old root (stage and host) is detached, so no path leads
   back to the host (the chroot `..` escape has nothing to climb to).

Until the last pivot_root, paths are resolved against the stage, which holds the host's tree,
so a symlink inside the image (`/data -> /oldroot/var/lib/x`) would steer a mount point, or a
directory we create, onto the host: `_mount_point` refuses any symlink on the way to a target.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import time

from pytest_minictr.container.failure import attempt
from pytest_minictr.errors import ContainerSetupError
from pytest_minictr.host import linux
from pytest_minictr.host.linux import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_STATVFS_FLAGS,
)

STAGE = "/tmp"          # where the stage is mounted; once we pivot into it, our "/"
HOST = "/oldroot"        # the host's tree, in the stage
ROOT = "/newroot"        # the container's root, in the stage
PROC, DEV = "/proc", "/dev"  # built in the stage, then moved under ROOT
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
# A device node bound from the host keeps the flags of the host's /dev unless we set them:
# nosuid and noexec, as bubblewrap's device binds and the host's devtmpfs have them (a node is
# never a program; nodev would make it useless).
DEVICE_BIND_FLAGS = MS_NOSUID | MS_NOEXEC
# runc's lists: what of /proc speaks of the host kernel rather than of our processes. Masked
# (an empty file or directory in its place): kernel memory and symbols, every user's keys,
# timers and scheduler state of other tasks, hardware. Read-only: the host kernel's knobs
# (core_pattern runs a program as host root: the classic escape), sysrq, interrupts, buses.
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug", "kallsyms", "latency_stats",
               "timer_stats", "acpi", "asound", "scsi")
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
_MOUNT_ATTRIBUTES = ((MS_RDONLY, linux.MOUNT_ATTR_RDONLY), (MS_NOSUID, linux.MOUNT_ATTR_NOSUID),
                     (MS_NODEV, linux.MOUNT_ATTR_NODEV))
_IDMAP_UNSUPPORTED = (errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP)
LAYER_LOCK_WAIT = 2.0  # seconds a container waits for the previous user of its layer to exit


def make_mounts_private() -> None:
    linux.mount(None, "/", None, MS_REC | linux.MS_PRIVATE)


def mount_stage() -> None:
    """The stage: a tmpfs over /tmp, in our mount namespace only (see above)."""
    attempt(f"mount tmpfs stage on {STAGE}", linux.mount, "minictr", STAGE, "tmpfs",
            MS_NOSUID | MS_NODEV, "mode=0700")
    for name in ("upper", "work", ROOT, HOST, PROC, DEV):
        os.mkdir(f"{STAGE}/{name.lstrip('/')}", 0o755)


def enter_stage() -> None:
    os.chdir(STAGE)
    linux.pivot_root(".", HOST.lstrip("/"))
    os.chdir("/")


def size_stage(layer_size: int | None) -> None:
    """`layer_size` bounds the stage, and with it the writable layer (a command filling it
    gets ENOSPC; the host's memory is spared)."""
    if layer_size is not None:
        linux.mount(None, "/", None, MS_REMOUNT | MS_NOSUID | MS_NODEV, f"size={layer_size}")


def lock_layer(layer_fd: int | None) -> int | None:
    """Two overlays on one upper dir at once corrupt each other: a kept layer is locked for
    the container's life (the lock goes with our last fd, at our exit). The previous user of
    the layer may still be exiting (its result is reported first): it gets a moment."""
    if layer_fd is None:
        return None
    fd = os.open(f"/proc/self/fd/{layer_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + LAYER_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ContainerSetupError("the layer directory is in use by another running "
                                          "container; give each running container its own",
                                          "lock the layer", errno.EBUSY) from None
            time.sleep(0.001)


def measure_layer(layer_fd: int | None) -> int:
    """Bytes the writable layer can hold (the stage's tmpfs, or a kept layer's filesystem):
    no file of the command may grow past it (RLIMIT_FSIZE)."""
    return measure_filesystem(layer_path(layer_fd))


def measure_filesystem(path: str) -> int:
    info = os.statvfs(path)
    return info.f_blocks * info.f_frsize


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


def open_host_path(path: str | None) -> int | None:
    """An O_PATH fd of a host path the spec names, through the host's tree in the stage. (It
    must be opened in this namespace: the kernel refuses to overlay or bind a mount of
    another one.)"""
    if path is None:
        return None
    try:
        return os.open(HOST + path, os.O_PATH | os.O_CLOEXEC)
    except OSError as error:
        raise ContainerSetupError(f"open {path}: {error.strerror}", f"open {path}",
                                  error.errno) from None


def close_fds(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def make_layer_dirs(layer_fd: int) -> None:
    """A kept layer's upper and work dirs, made by its first container."""
    for name in ("upper", "work"):
        attempt(f"create the layer's {name} dir", os.makedirs,
                f"{layer_path(layer_fd)}/{name}", 0o755, True)


def chown_layer(layer_fd: int | None, uid: int, gid: int) -> None:
    """The upper dir's root is the container's "/": its root must own it to write there."""
    os.chown(f"{layer_path(layer_fd)}/upper", uid, gid)


def mount_overlay(layer_fd: int | None, userxattr: bool, *lower_fds: int) -> None:
    """The base rootfs (an image: its layers, top first) under a writable layer: the stage's
    tmpfs, or a kept host directory (`spec.layer`: successive containers of one test then
    see each other's writes). `userxattr`: in a user namespace, where trusted.* xattrs are
    out of reach (an image's opaque directories then carry user.overlay.opaque)."""
    layer = layer_path(layer_fd)
    lower = ":".join(f"/proc/self/fd/{fd}" for fd in lower_fds)
    options = f"lowerdir={lower},upperdir={layer}/upper,workdir={layer}/work"
    linux.mount("overlay", ROOT, "overlay", MS_NOSUID | MS_NODEV,
                options + (",userxattr" if userxattr else ""))


def bind_host_root() -> None:
    """A sandboxed test body's root (see `body_plan.body_view`): the host's whole tree, every
    submount read-only, nosuid and nodev. The body owns none of these mounts' namespace's
    privileges (capabilities dropped, mount calls refused by seccomp): it cannot undo that."""
    linux.mount(HOST, ROOT, None, MS_BIND | MS_REC)
    attempt("make the host's tree read-only", linux.set_tree_attributes, ROOT,
            linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV)


def move_into_root(path: str) -> None:
    """Move what the stage holds at `path` (our /proc, /dev) to the same place in the root;
    MS_MOVE takes their masks and submounts along."""
    linux.mount(path, _mount_point(path, True), None, linux.MS_MOVE)


def mount_tmp(layer_size: int | None) -> None:
    # /tmp is writable too: the layer's bound holds for it as well
    size = "" if layer_size is None else f",size={layer_size}"
    mount_tmpfs(_mount_point("/tmp", True), "mode=1777" + size)


def layer_path(layer_fd: int | None) -> str:
    return "/" if layer_fd is None else f"/proc/self/fd/{layer_fd}"


def idmapped(rootfs_fd: int, userns_fd: int, host_uid: int) -> int:
    """A detached view of the base whose host-root files read as container root's (the
    overlay keeps it alive); none needed for a base the mapped range owns already (our cache,
    see idmap). Where the kernel or the filesystem cannot idmap (before 5.12; tmpfs before
    6.3; NFS), the base stays as it is: readable, but its root-owned directories not writable
    inside."""
    if os.fstat(rootfs_fd).st_uid == host_uid:
        return rootfs_fd
    try:
        return linux.open_idmapped_tree(rootfs_fd, userns_fd)
    except OSError as error:
        if error.errno in _IDMAP_UNSUPPORTED:
            return rootfs_fd
        raise ContainerSetupError(f"idmap the rootfs: {error.strerror}", "idmap the rootfs",
                                  error.errno) from None


def mount_proc() -> None:
    linux.mount("proc", PROC, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mask_proc(masked: tuple[str, ...], read_only: tuple[str, ...]) -> None:
    """Mask PROC_MASKED (those this kernel has) with /dev/null or an empty read-only tmpfs;
    bind PROC_READ_ONLY read-only over themselves. Root inside cannot undo either: mounting
    needs CAP_SYS_ADMIN over our mount namespace, which it never has, and seccomp."""
    for name in masked:
        path = f"{PROC}/{name}"
        if os.path.isdir(path):
            attempt(f"mask /proc/{name}", mount_tmpfs, path, "size=0,mode=0555", MS_RDONLY)
        elif os.path.exists(path):
            attempt(f"mask /proc/{name}", linux.mount, f"{HOST}/dev/null", path, None, MS_BIND)
    for name in read_only:
        path = f"{PROC}/{name}"
        if os.path.exists(path):
            attempt(f"bind /proc/{name} read-only", bind_read_only, path)


def bind_read_only(path: str) -> None:
    linux.mount(path, path, None, MS_BIND | MS_REC)
    linux.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                | MS_NOEXEC)


def mount_dev(nodes: tuple[str, ...], links: tuple[tuple[str, str], ...],
              bind_flags: int) -> None:
    """A tmpfs /dev with only harmless `nodes`, bound from the host with `bind_flags` (mknod is
    not ours to use; nodev: a node made anyway would not open), and `links`."""
    attempt("mount /dev", linux.mount, "minictr-dev", DEV, "tmpfs",
            MS_NOSUID | MS_NOEXEC | MS_NODEV, "mode=0755,size=1m")
    for name in nodes:
        target = f"{DEV}/{name}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        attempt(f"bind /dev/{name}", bind_device, f"{HOST}/dev/{name}", target, bind_flags)
    for name, link in links:
        os.symlink(link, f"{DEV}/{name}")
    os.mkdir(DEV + "/pts", 0o755)
    attempt("mount /dev/pts", linux.mount, "devpts", DEV + "/pts", "devpts",
            MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(DEV + "/shm", 0o1777)
    attempt("mount /dev/shm", mount_tmpfs, DEV + "/shm", "mode=1777,size=64m", MS_NOEXEC)


def bind_device(source: str, target: str, flags: int) -> None:
    linux.mount(source, target, None, MS_BIND)
    linux.mount(None, target, None, MS_REMOUNT | MS_BIND | flags)


def make_root_read_only() -> None:
    """`read_only=True`: the root's own mount only; /tmp, /dev and the user's mounts under it
    keep theirs (a per-mount flag: MS_BIND with MS_REMOUNT, the overlay itself untouched)."""
    linux.mount(None, ROOT, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _statvfs_mount_flags(ROOT))


def bind_text_file(text: str, target: str) -> None:
    """A file of the stage holding `text`, bound on `target` in the root (made in the layer
    if missing, where container root may); an image whose `target` (or a directory on its
    way) is a symlink keeps its own: a mount point may not lead through one (see
    `_mount_point`)."""
    path = ROOT
    for part in target.strip("/").split("/"):
        path = f"{path}/{part}"
        if os.path.islink(path):
            return
    try:
        point = _mount_point(target, False)
    except ContainerSetupError as error:
        # a root whose /etc container root may not write (a root-owned rootfs, without
        # root): it keeps its own files, if any
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return
        raise
    staged = "/" + target.strip("/").replace("/", "-")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    linux.mount(staged, point, None, MS_BIND)


def mount_tmpfs(target: str, options: str, extra_flags: int = 0) -> None:
    linux.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | extra_flags, options)


def mount_user_tmpfs(target: str, size: int | None) -> None:
    mount_tmpfs(_mount_point(target, True), "mode=1777" + (f",size={size}" if size else ""))


def bind_user_mount(source_fd: int, target: str, read_only: bool) -> None:
    source = f"/proc/self/fd/{source_fd}"
    point = _mount_point(target, os.path.isdir(source))
    linux.mount(source, point, None, MS_BIND | MS_REC)
    # a setuid binary or a device node planted through a bind must mean nothing here, nor on
    # the host; and read-only must hold for every mount under the bind too, not just its top
    extra = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    attempt(f"restrict {target}", restrict_mount_tree, point, extra)


def restrict_mount_tree(top: str, extra_flags: int) -> None:
    """Add `extra_flags` (of MS_RDONLY, MS_NOSUID, MS_NODEV) to `top` and every mount below
    it: in one call where the kernel has mount_setattr(2) (5.12); else a remount of each,
    which reads the mount table first (~0.2 ms a bind under a body's whole host tree)."""
    try:
        linux.set_tree_attributes(top, sum(attribute for flag, attribute in _MOUNT_ATTRIBUTES
                                           if extra_flags & flag))
        return
    except OSError as error:
        if error.errno != errno.ENOSYS:
            raise
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


def enter_root() -> None:
    """pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    only the new root, with no directory needed to park the old one in."""
    os.chdir(ROOT)
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
