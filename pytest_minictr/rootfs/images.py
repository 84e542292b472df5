"""Root filesystems from elsewhere: `import_image(IMAGE.tar, DEST)` unpacks a `docker save` or
OCI image layout tarball, no daemon (`minictr rootfs import`), and keeps the image's default
command (its Entrypoint and Cmd, as Docker runs them) for a run that gives none.

An image tarball is untrusted input. Unpacking it writes only inside DEST:
- a member named with an absolute path or a `..` component is refused (RootfsError names it);
- nothing is written through a symlink: every parent directory of a member must be a real
  directory inside DEST (a symlink met on the way is refused), and files are created with
  O_NOFOLLOW|O_EXCL after removing what was there; symlinks themselves are created as they are
  (an absolute target is resolved inside the container's root when it runs, never here);
- a hard link must name a regular file already unpacked inside DEST;
- device nodes and FIFOs are skipped (a container gets its own /dev), setuid and setgid bits
  dropped;
- the bytes unpacked (sparse files counted at their full size) are capped by `max_size`.
Layers are applied in order; whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove what lower layers
put there.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO, Any

from pytest_minictr.errors import RootfsError
from pytest_minictr.rootfs.builder import clear_dest, make_dest, normalize_dest
from pytest_minictr.rootfs.cache import write_image_config

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def import_image(image: str, dest: str, max_size: int) -> Path:
    """Unpack the image's layers into `dest` (absent or empty); its path."""
    dest = normalize_dest(dest)
    created = make_dest(dest)
    try:
        with tarfile.open(image) as outer:
            budget = [max_size]
            layers, config = image_parts(outer)
            for name in layers:
                with tarfile.open(fileobj=_member_file(outer, name), mode="r:*") as layer:
                    apply_layer(layer, dest, budget)
            write_image_config(dest, image_command(outer, config), "image")
    except BaseException as error:
        clear_dest(dest, created)
        if isinstance(error, (OSError, tarfile.TarError)):
            raise RootfsError(f"cannot import {image}: {error}") from None
        raise
    os.chmod(dest, 0o755)
    return Path(dest)


def image_parts(outer: tarfile.TarFile) -> tuple[list[str], str | None]:
    """The layer blobs in order and the config blob (None if the image names none), from
    `manifest.json` (docker save) or `index.json` (OCI)."""
    names = set(_outer_members(outer))
    if "manifest.json" in names:
        manifest = _json_member(outer, "manifest.json")
        return list(manifest[0]["Layers"]), manifest[0].get("Config")
    if "index.json" in names:
        manifest = _json_member(outer, "index.json")
        while "layers" not in manifest:  # an index (of indexes): its first manifest
            manifest = _json_member(outer, _blob(manifest["manifests"][0]["digest"]))
        config = manifest.get("config", {}).get("digest")
        return ([_blob(layer["digest"]) for layer in manifest["layers"]],
                None if config is None else _blob(config))
    raise RootfsError("not an image tarball: no manifest.json (docker save) or index.json "
                      "(OCI image layout) in it")


def image_command(outer: tarfile.TarFile, config_name: str | None) -> tuple[str, ...]:
    """What Docker runs when given no command: the config's Entrypoint, then its Cmd; () if
    the image has neither (`minictr run --rootfs` then says so)."""
    if config_name is None or _plain(config_name) not in _outer_members(outer):
        return ()  # (an image saved by hand may lack it: its layers are what runs)
    document = _json_member(outer, config_name)
    settings = document.get("config") if isinstance(document, dict) else None
    settings = settings if isinstance(settings, dict) else {}
    command = [*(settings.get("Entrypoint") or ()), *(settings.get("Cmd") or ())]
    if not all(isinstance(word, str) for word in command):
        raise RootfsError(f"{config_name} in the image: Entrypoint and Cmd must be lists of "
                          f"strings, not {command!r}")
    return tuple(command)


def _blob(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    return f"blobs/{algorithm}/{value}"


def _json_member(outer: tarfile.TarFile, name: str) -> Any:
    try:
        return json.load(_member_file(outer, name))
    except ValueError as error:
        raise RootfsError(f"{name} in the image is not JSON: {error}") from None


def _outer_members(outer: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The image tarball's members by their names without './' (`tar -C dir -c .` writes
    './manifest.json'; Docker and Podman take either spelling)."""
    return {_plain(member.name): member for member in outer.getmembers()}


def _plain(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _member_file(outer: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        member = _outer_members(outer)[_plain(name)]
    except KeyError:
        raise RootfsError(f"the image names {name}, which it does not hold") from None
    file = outer.extractfile(member)
    if file is None:
        raise RootfsError(f"{name} in the image is not a regular file")
    return file


def apply_layer(layer: tarfile.TarFile, dest: str, budget: list[int]) -> None:
    members = [(safe_name(member.name), member) for member in layer.getmembers()]
    for name, _ in members:  # whiteouts first: they concern the lower layers
        base = os.path.basename(name)
        if base == OPAQUE:
            directory = _inside(dest, os.path.dirname(name))
            if os.path.isdir(directory) and not os.path.islink(directory):
                for entry in os.listdir(directory):
                    _remove(os.path.join(directory, entry))
        elif base.startswith(WHITEOUT):
            _remove(_inside(dest, os.path.join(os.path.dirname(name), base[len(WHITEOUT):])))
    for name, member in members:
        if name and not os.path.basename(name).startswith(WHITEOUT):
            _unpack(layer, member, name, dest, budget)


def safe_name(name: str) -> str:
    """The member's path relative to the root; RootfsError for one that would leave it."""
    if name.startswith("/") or ".." in name.split("/"):
        raise RootfsError(f"refused: member {name!r} points outside the rootfs "
                          "(absolute, or with '..')")
    return _plain(name)


def _inside(dest: str, name: str) -> str:
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


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _unpack(layer: tarfile.TarFile, member: tarfile.TarInfo, name: str, dest: str,
            budget: list[int]) -> None:
    target = _inside(dest, name)
    mode = stat.S_IMODE(member.mode) & ~(stat.S_ISUID | stat.S_ISGID)
    if member.isdir():
        if os.path.lexists(target) and not os.path.isdir(target):
            _remove(target)
        os.makedirs(target, exist_ok=True)
        os.chmod(target, mode)
    elif member.isreg():
        budget[0] -= member.size
        if budget[0] < 0:
            raise RootfsError(f"refused: the image unpacks to more than its size limit "
                              f"(at {name!r}; --max-size raises it)")
        _remove(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            contents = layer.extractfile(member)
            assert contents is not None  # a regular file's member has them
            shutil.copyfileobj(contents, out)
        os.chmod(target, mode)
    elif member.issym():
        _remove(target)
        os.symlink(member.linkname, target)
    elif member.islnk():
        source = os.path.join(dest, safe_name(member.linkname))
        if not os.path.isfile(source) or os.path.islink(source):
            raise RootfsError(f"refused: hard link {name!r} to {member.linkname!r}, not a file "
                              "unpacked before it")
        _remove(target)
        os.link(source, target)
    else:
        return  # device nodes, FIFOs: never from an image
    if os.geteuid() == 0 and member.uid < 65536 and member.gid < 65536:
        os.lchown(target, member.uid, member.gid)
