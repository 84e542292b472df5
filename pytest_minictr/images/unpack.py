"""Writing a layer tarball's members into a directory, where the tarball is untrusted input.

Used by `minictr rootfs import` (every layer flattened into one tree) and by the image store
(each layer in a directory of its own, stacked later by overlay). Either way only the
directory given is written:
- a member named with an absolute path or a `..` component is refused (RootfsError names it);
- nothing is written through a symlink: every parent directory of a member must be a real
  directory inside the destination (a symlink met on the way is refused), and files are
  created with O_NOFOLLOW|O_EXCL after removing what was there; symlinks themselves are
  created as they are (an absolute target is resolved inside the container's root when it
  runs, never here);
- a hard link must name a regular file already unpacked inside the destination;
- device nodes and FIFOs are skipped (a container gets its own /dev); setuid and setgid bits
  are dropped unless the caller keeps them (root's image store: `su` must stay setuid);
- the bytes unpacked (sparse files counted at their full size, and 512 more for every entry)
  are capped by the budget, so a decompression bomb stops at the cap.

In a store layer, the OCI whiteouts become overlayfs's: `.wh.NAME` a 0/0 character device
named NAME, `.wh..wh..opq` the directory's `overlay.opaque` xattr (`trusted.` for root,
`user.` otherwise, which overlay reads with its `userxattr` option). Where neither can be
made (no device for an account on an old kernel, no user xattrs on tmpfs before 6.6), the
OCI marker file itself is kept, empty, for a reader that knows OCI's spelling.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from typing import IO

from pytest_minictr.errors import RootfsError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


ENTRY_COST = 512  # what an entry counts beyond its bytes: a million empty files are a bomb too


class Budget:
    """The bytes a pull or an import may still unpack."""

    def __init__(self, limit: int):
        self.left = limit

    def spend(self, size: int, name: str) -> None:
        self.left -= size
        if self.left < 0:
            raise RootfsError(f"refused: the image unpacks to more than its size limit (at "
                              f"{name!r}; a decompression bomb, or raise the limit)")


def unpack_layer(stream: IO[bytes], dest: str, budget: Budget, keep_setuid: bool) -> None:
    """A layer (an uncompressed tar stream) into `dest`, an empty directory of its own, its
    whiteouts written as overlay's. The stream is read in order, once: it may be a download."""
    with tarfile.open(fileobj=stream, mode="r|") as layer:
        for member in layer:
            name = safe_name(member.name)
            base = os.path.basename(name)
            if base == OPAQUE:
                mark_opaque(os.path.dirname(inside(dest, name)))
            elif base.startswith(WHITEOUT):
                write_whiteout(dest, os.path.dirname(name), base[len(WHITEOUT):])
            elif name:
                write_member(layer, member, name, dest, budget, keep_setuid)


def mark_opaque(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            os.setxattr(directory, name, b"y", follow_symlinks=False)
            return
        except OSError:  # trusted.* is root's; tmpfs before Linux 6.6 has no user.*
            continue
    _keep_marker(os.path.join(directory, OPAQUE))


def write_whiteout(dest: str, parent: str, hidden: str) -> None:
    if hidden in ("", ".", ".."):
        raise RootfsError(f"refused: whiteout {parent}/.wh.{hidden!r} names no file")
    target = inside(dest, os.path.join(parent, hidden))
    if os.path.lexists(target):
        return  # the layer also holds NAME itself: what it holds wins over the lower layers
    try:
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    except PermissionError:
        _keep_marker(inside(dest, os.path.join(parent, WHITEOUT + hidden)))


def _keep_marker(path: str) -> None:
    """The OCI whiteout file itself, empty, where overlay's form cannot be made."""
    if not os.path.lexists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))


def safe_name(name: str) -> str:
    """The member's path relative to the root; RootfsError for one that would leave it."""
    if name.startswith("/") or ".." in name.split("/"):
        raise RootfsError(f"refused: member {name!r} points outside the rootfs "
                          "(absolute, or with '..')")
    return plain_name(name)


def plain_name(name: str) -> str:
    """`name` without '.' and empty parts (`tar -C dir -c .` writes './etc/passwd')."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def inside(dest: str, name: str) -> str:
    """dest/name, its parents real directories (made if missing), none a symlink."""
    path = dest
    parts = [part for part in name.split("/") if part]
    for part in parts[:-1]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise RootfsError(f"refused: {name!r} goes through {path[len(dest):]!r}, which is "
                              "not a directory (a symlink?)")
    return os.path.join(path, parts[-1]) if parts else path


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def write_member(layer: tarfile.TarFile, member: tarfile.TarInfo, name: str, dest: str,
                 budget: Budget, keep_setuid: bool = False) -> None:
    target = inside(dest, name)
    budget.spend(ENTRY_COST + (member.size if member.isreg() else 0), name)
    mode = stat.S_IMODE(member.mode)
    if not keep_setuid:
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
    if member.isdir():
        if os.path.lexists(target) and not os.path.isdir(target):
            remove_path(target)
        os.makedirs(target, exist_ok=True)
        os.chmod(target, mode)
    elif member.isreg():
        _write_file(layer, member, target)
        os.chmod(target, mode)
    elif member.issym():
        if not member.linkname:
            raise RootfsError(f"refused: symlink {name!r} has no target")
        remove_path(target)
        os.symlink(member.linkname, target)
    elif member.islnk():
        source = os.path.join(dest, safe_name(member.linkname))
        if not os.path.isfile(source) or os.path.islink(source):
            raise RootfsError(f"refused: hard link {name!r} to {member.linkname!r}, not a file "
                              "unpacked before it")
        remove_path(target)
        os.link(source, target)
    else:
        return  # device nodes, FIFOs: never from an image
    if os.geteuid() == 0 and member.uid < 65536 and member.gid < 65536:
        os.lchown(target, member.uid, member.gid)
        if mode & (stat.S_ISUID | stat.S_ISGID) and not member.issym():
            os.chmod(target, mode)  # chown clears setuid and setgid
    if not member.isdir():
        # Python's .pyc files hold their source's mtime: a new one would make them all stale
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


def _write_file(layer: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
    remove_path(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        contents = layer.extractfile(member)
        assert contents is not None  # a regular file's member has them
        shutil.copyfileobj(contents, out)
