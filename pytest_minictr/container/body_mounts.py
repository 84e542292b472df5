"""The mounts only a sandboxed test body's view needs (see `body_plan.body_view`): host paths
hidden under the read-only host tree, and a private /tmp over the host's.

Run in the body's mount namespace (as root, the spare's; without root, its init's), after
`mounts.bind_host_root` and before pivot_root, with the stage as "/" (see `mounts`).
"""

from __future__ import annotations

import errno
import os
import time

from pytest_minictr.container.failure import attempt
from pytest_minictr.container.mounts import (
    DEVICE_BIND_FLAGS,
    HOST,
    ROOT,
    bind_device,
    mount_tmp,
    mount_tmpfs,
)
from pytest_minictr.errors import ContainerSetupError
from pytest_minictr.host import linux
from pytest_minictr.host.linux import MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REMOUNT

TMP_LAYER = "/body-tmp"  # in the stage: the upper and work dirs of the body's /tmp
ETC_COVER = "/body-etc"  # in the stage: the layer of empty files laid over the host's /etc
# A hiding tmpfs holds only the mount points of what is bound back into it (see seal_hidden)
HIDING_OPTIONS = "mode=0755,size=64k,nr_inodes=1024"
HIDE_TRIES = 50  # a path replaced this often while one body starts is not a race any more
HIDE_PAUSE = 0.0005  # s between tries: failures come in runs while a renamer is busy


def hide_host_path(path: str) -> None:
    """Cover `path` of the read-only host tree: an empty tmpfs over a directory, /dev/null
    (read-only) over a file. A path missing, or a symlink by now, is left as it is: the
    worker resolved it, and a mount through a symlink would land elsewhere in the stage."""
    target = ROOT + path
    for tries_left in reversed(range(HIDE_TRIES)):
        if os.path.islink(target) or not os.path.lexists(target):
            return
        try:
            _cover(path, target)
            return
        except ContainerSetupError as error:
            # useradd, passwd... replace /etc/shadow by a rename over it, maybe while a body
            # starts (tests making accounts in another worker): the bind fails ENOENT on the
            # old file's unlinked dentry (3% of binds during renames, measured), or the
            # remount EINVAL on the new file, where the bind is not: look again
            if error.errno not in (errno.ENOENT, errno.EINVAL) or not tries_left:
                raise
            time.sleep(HIDE_PAUSE)


def cover_etc_files(paths: tuple[str, ...]) -> None:
    """Cover the secret files of the host's /etc (`paths`, absolute, under /etc) by name: a
    read-only overlay of the host's /etc beneath a layer that holds an empty file of each
    name. A mount on the file itself covers one inode: a program that renames a new file over
    it (useradd, passwd, chpasswd do so with /etc/shadow) puts the new one in plain view of a
    body that runs meanwhile; a name in an upper layer wins over whatever the host's /etc
    holds under it now or later. Where the kernel refuses the overlay (before 5.11 in a user
    namespace), each file is covered as before: by /dev/null on its inode."""
    if not paths:
        return
    try:
        _lay_empty_files(paths)
        linux.mount("overlay", f"{ROOT}/etc", "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV,
                    f"lowerdir={ETC_COVER}:{ROOT}/etc")
    except OSError:
        for path in paths:
            hide_host_path(path)


def _lay_empty_files(paths: tuple[str, ...]) -> None:
    """The overlay's top layer (a lower one: the overlay writes nothing): each path's
    directories as the host has them (a merged directory takes its owner and mode from the
    uppermost layer), and an empty file of each name, readable as /dev/null was."""
    os.makedirs(ETC_COVER, 0o755, exist_ok=True)
    for path in paths:
        relative = os.path.relpath(path, "/etc")
        for parent in _parents(relative):
            here = os.path.join(ETC_COVER, parent)
            if not os.path.isdir(here):
                host = os.stat(f"{ROOT}/etc/{parent}")
                os.mkdir(here)
                os.chown(here, host.st_uid, host.st_gid)
                os.chmod(here, host.st_mode & 0o7777)
        os.close(os.open(os.path.join(ETC_COVER, relative), os.O_CREAT | os.O_WRONLY, 0o644))


def _parents(relative: str) -> list[str]:
    """The directories above a relative path, outermost first: ssh/keys/a -> ssh, ssh/keys."""
    parts = relative.split("/")[:-1]
    return ["/".join(parts[:count]) for count in range(1, len(parts) + 1)]


def _cover(path: str, target: str) -> None:
    if os.path.isdir(target):
        # writable until sealed: what is bound back into it needs its mount points made
        attempt(f"hide {path}", mount_tmpfs, target, HIDING_OPTIONS)
    else:
        attempt(f"hide {path}", bind_device, f"{HOST}/dev/null", target,
                DEVICE_BIND_FLAGS | MS_RDONLY)


def seal_hidden(path: str) -> None:
    """Make a hiding tmpfs read-only, once the paths bound back into it are mounted: the
    body may not write where the host's tree is (the flag is the mount's, not its tree's:
    a writable path bound below keeps its own)."""
    target = ROOT + path
    if os.path.isdir(target) and not os.path.islink(target) and os.path.ismount(target):
        attempt(f"seal {path}", linux.mount, None, target, None,
                MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def mount_tmp_over_host(layer_size: int | None, userxattr: bool) -> None:
    """The body's /tmp: an overlay whose lower layer is the host's /tmp (what fixtures made
    there with tempfile or tmp_path_factory, a venv there) and whose upper is a tmpfs of its
    own, so its writes never reach the host. Where the kernel refuses the overlay (before
    5.11 in a user namespace; a host /tmp it cannot stack on), a plain tmpfs, as before."""
    os.makedirs(TMP_LAYER, 0o700, exist_ok=True)
    size = "" if layer_size is None else f",size={layer_size}"
    mount_tmpfs(TMP_LAYER, "mode=0755" + size)
    os.mkdir(f"{TMP_LAYER}/upper")
    os.chmod(f"{TMP_LAYER}/upper", 0o1777)  # the overlay's root takes the upper's mode
    os.mkdir(f"{TMP_LAYER}/work", 0o700)
    options = (f"lowerdir={HOST}/tmp,upperdir={TMP_LAYER}/upper,workdir={TMP_LAYER}/work"
               + (",userxattr" if userxattr else ""))
    try:
        linux.mount("overlay", f"{ROOT}/tmp", "overlay", MS_NOSUID | MS_NODEV, options)
    except OSError:
        mount_tmp(layer_size)
