"""Root filesystems from elsewhere: `import_image(IMAGE.tar, DEST)` unpacks a `docker save` or
OCI image layout tarball, no daemon (`minictr rootfs import`), and keeps the image's default
command (its Entrypoint and Cmd, as Docker runs them) for a run that gives none.

An image tarball is untrusted input: its members are written by `images.unpack`, which
writes only inside DEST (its docstring lists the rules); setuid and setgid bits are dropped,
and the bytes unpacked are capped by `max_size`.
Layers are applied in order; whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove what lower layers
put there.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import IO, Any

from pytest_minictr.errors import RootfsError
from pytest_minictr.images.unpack import (
    OPAQUE,
    WHITEOUT,
    Budget,
    inside,
    plain_name,
    remove_path,
    safe_name,
    write_member,
)
from pytest_minictr.rootfs.builder import clear_dest, make_dest, normalize_dest
from pytest_minictr.rootfs.cache import write_image_config


def import_image(image: str, dest: str, max_size: int) -> Path:
    """Unpack the image's layers into `dest` (absent or empty); its path."""
    dest = normalize_dest(dest)
    created = make_dest(dest)
    try:
        with tarfile.open(image) as outer:
            budget = Budget(max_size)
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
    if config_name is None or plain_name(config_name) not in _outer_members(outer):
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
    return {plain_name(member.name): member for member in outer.getmembers()}



def _member_file(outer: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        member = _outer_members(outer)[plain_name(name)]
    except KeyError:
        raise RootfsError(f"the image names {name}, which it does not hold") from None
    file = outer.extractfile(member)
    if file is None:
        raise RootfsError(f"{name} in the image is not a regular file")
    return file


def apply_layer(layer: tarfile.TarFile, dest: str, budget: Budget) -> None:
    """The layer onto the tree in `dest`: its whiteouts first (they remove what the layers
    below put there), then its members."""
    members = [(safe_name(member.name), member) for member in layer.getmembers()]
    for name, _ in members:  # whiteouts first: they concern the lower layers
        base = os.path.basename(name)
        if base == OPAQUE:
            directory = inside(dest, os.path.dirname(name))
            if os.path.isdir(directory) and not os.path.islink(directory):
                for entry in os.listdir(directory):
                    remove_path(os.path.join(directory, entry))
        elif base.startswith(WHITEOUT):
            remove_path(inside(dest, os.path.join(os.path.dirname(name), base[len(WHITEOUT):])))
    for name, member in members:
        if name and not os.path.basename(name).startswith(WHITEOUT):
            write_member(layer, member, name, dest, budget)


