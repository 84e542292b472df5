"""The rootfs cache: where entries live, the manifest that marks one complete and lists the
host files it copied, the freshness check of a cache hit, and atomic publication; and the
default command a rootfs declares.

An entry is a directory, ``<cache>/<key>``, holding the root filesystem (``rootfs/``, what a
container sees as its ``/``) and, beside it, its manifest (``manifest.json``: the inputs, and
each host file copied with its device, inode, size and mtime). The manifest is never inside
the rootfs: a container must find nothing there that names the host. Both are written in
``.tmp-<key>-<pid>-<random>`` and published by one rename of that directory, so concurrent
builders (pytest-xdist) never see an entry without its manifest, nor a manifest before its
tree is complete, and all get the same path; a stale entry is renamed to
``<key>.stale-<random>`` for a later prune. Entries of the earlier format (the manifest
inside the tree, format 2) are never looked up again: the format is part of the key, so they
are rebuilt under a new one, and `minictr rootfs prune` removes them. Its upkeep:
`cache_entries()` (what `minictr rootfs list` shows) and `prune()`.

A rootfs outside the cache (``dest=``, ``minictr rootfs import``) keeps its default command,
and nothing else of ours, in ``/.minictr-image.json`` (`write_image_config`).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_minictr.errors import ConfigError, MinictrError

if TYPE_CHECKING:
    from pytest_minictr.rootfs.builder import Request

FORMAT_VERSION = 3
ROOTFS_NAME = "rootfs"           # an entry's tree: the containers' root
MANIFEST_NAME = "manifest.json"  # beside it, in the entry
IMAGE_CONFIG_NAME = ".minictr-image.json"  # in a rootfs of your own: its default command


def default_cache_dir() -> Path:
    """$MINICTR_CACHE_DIR, else $XDG_CACHE_HOME/minictr, else ~/.cache/minictr."""
    if os.environ.get("MINICTR_CACHE_DIR"):
        return Path(os.environ["MINICTR_CACHE_DIR"]).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return Path(xdg, "minictr")
    return Path.home() / ".cache" / "minictr"


def rootfs_of(entry: str) -> str:
    """The root filesystem of the cache entry `entry`."""
    return os.path.join(entry, ROOTFS_NAME)


@dataclass(frozen=True)
class SourceStat:
    """Identity of one host file: any change of these four means the copy may be outdated."""
    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, st: os.stat_result | None = None) -> SourceStat:
        st = os.lstat(path) if st is None else st
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def write_manifest(entry: str, request: Request, sources: dict[str, SourceStat]) -> None:
    """The manifest of the entry being built in `entry` (a temp dir, published after)."""
    manifest = {"format": FORMAT_VERSION, "inputs": asdict(request),
                "sources": [asdict(s) for s in sources.values()]}
    with open(os.path.join(entry, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=0)
    os.chmod(os.path.join(entry, MANIFEST_NAME), 0o644)
    # mkdtemp made the entry 0700; containers in a userns must reach and read its rootfs
    for directory in (entry, rootfs_of(entry)):
        os.chmod(directory, 0o755)


def write_image_config(root: str, command: tuple[str, ...], source: str) -> None:
    """What a rootfs of your own says of itself: its default command, and whether it came
    from an image (`source`: "image") or a recipe. Nothing that names the host."""
    path = os.path.join(root, IMAGE_CONFIG_NAME)
    if os.path.lexists(path):  # an image's own file of that name (a symlink out, even)
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"command": list(command), "from": source}, f)


def default_command(root: str, what: str) -> tuple[str, ...]:
    """The default command the rootfs `root` declares (a recipe's; an image's Entrypoint
    and Cmd); a ConfigError, beginning with `what`, that says why there is none."""
    config = _image_config(root)
    command = tuple(config.get("command") or ())
    if command:
        return command
    if config.get("from") == "image":
        raise ConfigError(f"{what}: the image imported into {root!r} had no Cmd (nor "
                          "Entrypoint) to run by default; give the command")
    raise ConfigError(f"{what}: the rootfs {root!r} has no default command (a recipe "
                      "declares one: recipe='redis', 'postgresql'; an imported image its Cmd); "
                      "give the command")


def image_command(root: str) -> tuple[str, ...]:
    """The default command a recipe or an image declared for the rootfs `root` (docker's
    CMD); () if it has none, or is no rootfs we built or imported."""
    return tuple(_image_config(root).get("command") or ())


def _image_config(root: str) -> dict[str, Any]:
    """The rootfs' own config, else (a cache entry's rootfs) what its manifest says."""
    try:
        with open(os.path.join(root, IMAGE_CONFIG_NAME), "rb") as f:
            config = json.load(f)
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        pass
    if os.path.basename(os.path.normpath(root)) != ROOTFS_NAME:
        return {}
    try:
        with open(os.path.join(os.path.dirname(os.path.normpath(root)), MANIFEST_NAME),
                  "rb") as f:
            manifest = json.load(f)
        if manifest["format"] == FORMAT_VERSION:
            return {"command": manifest["inputs"].get("command"), "from": "recipe"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}


# manifest path -> (its identity, what it says of each source): a manifest is written once,
# and parsing a recipe's (python3: 188 sources) was a third of a cache hit
_manifests: dict[str, tuple[tuple, list[tuple[str, tuple[int, int, int, int]]]]] = {}


def is_fresh(entry: str) -> bool:
    """`entry` is complete and every host file copied into it is still the very same one (the
    cache-hit path)."""
    try:
        for path, recorded in _sources_of(os.path.join(entry, MANIFEST_NAME)):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != recorded:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sources_of(manifest_path: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    st = os.stat(manifest_path)
    identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    known = _manifests.get(manifest_path)
    if known is not None and known[0] == identity:
        return known[1]
    with open(manifest_path, "rb") as f:
        manifest = json.load(f)
    if manifest["format"] != FORMAT_VERSION:
        raise ValueError("a manifest of another format: rebuild")
    sources = [(source["path"], (source["dev"], source["ino"], source["size"],
                                 source["mtime_ns"])) for source in manifest["sources"]]
    _manifests[manifest_path] = (identity, sources)
    return sources


def remove_dead_temp_dirs(cache_dir: str) -> None:
    # A builder killed mid-build leaves .tmp-<key>-<pid>-<random>; a reused pid only delays
    # the cleanup.  Live builders' dirs must stay: they are being written right now.
    for name in os.listdir(cache_dir):
        fields = name.split("-")
        if name.startswith(".tmp-") and len(fields) == 4 and fields[2].isdigit():
            try:
                os.kill(int(fields[2]), 0)  # EPERM (PermissionError) also means alive
            except ProcessLookupError:
                shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
            except OSError:
                pass


def _rename_in(tmp: str, entry: str) -> bool:
    """Atomically publish `tmp` as `entry`; False if an entry is already there."""
    try:
        os.rename(tmp, entry)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


def publish(tmp: str, entry: str) -> None:
    """Make the complete entry `tmp` (its rootfs and manifest) the cache's `entry`, or drop
    it for an equal one there.

    Either a concurrent builder won the race (its entry is used), or the entry is stale (a
    host file changed since): then it is renamed aside, not deleted, since running containers
    may still use the old tree, and ours goes in its place."""
    if _rename_in(tmp, entry):
        return
    if not is_fresh(entry):
        try:
            os.rename(entry, f"{entry}.stale-{secrets.token_hex(4)}")
        except FileNotFoundError:
            pass  # another builder moved it aside first
        if _rename_in(tmp, entry):
            return
    shutil.rmtree(tmp)


# --- upkeep ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    """One complete entry of the cache, as `minictr rootfs list` shows it."""
    key: str
    recipe: str
    binaries: tuple[str, ...]
    size: int          # bytes on disk, as `du -s` counts them (each inode once)
    shared: int        # of which hard links to files outside it (the host's): kept by a prune
    age: float         # seconds since it was built
    path: str          # its root filesystem


def cache_entries(cache: Path | None = None) -> list[CacheEntry]:
    """The complete entries of `cache` (default: default_cache_dir()), by key."""
    cache = default_cache_dir() if cache is None else cache
    entries = []
    for entry in sorted(cache.iterdir()) if cache.is_dir() else ():
        manifest = entry / MANIFEST_NAME
        if not entry.is_dir() or entry.name.startswith(".") or not manifest.is_file():
            continue
        try:
            inputs = json.loads(manifest.read_text()).get("inputs", {})
        except (OSError, ValueError):
            inputs = {}
        entries.append(CacheEntry(entry.name, inputs.get("recipe") or "",
                                  tuple(inputs.get("binaries", [])), *_disk_usage(entry),
                                  time.time() - manifest.stat().st_mtime,
                                  rootfs_of(str(entry))))
    return entries


def _disk_usage(root: Path) -> tuple[int, int]:
    """What `root` takes on disk (allocated blocks, as du: directories and symlinks too, an
    inode linked twice counted once), and how much of it is files hard-linked from outside."""
    total = shared = 0
    seen = set()
    for directory, subdirs, names in os.walk(root):
        for path in (directory, *(os.path.join(directory, n) for n in subdirs + names)):
            st = os.lstat(path)
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += st.st_blocks * 512  # st_blocks counts 512-byte units, whatever the fs
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                shared += st.st_blocks * 512
    return total, shared


def prune(cache: Path | None = None) -> int:
    """Empty the cache; returns how many entries went. Each is renamed aside first, so that
    no builder sees half of one."""
    cache = default_cache_dir() if cache is None else cache
    removed = 0
    for entry in list(cache.iterdir()) if cache.is_dir() else ():
        if entry.is_dir():
            aside = cache / f".pruned-{entry.name}-{os.getpid()}"
            try:
                os.rename(entry, aside)
            except OSError as error:
                raise MinictrError(f"cannot prune {entry}: {error.strerror}") from None
            shutil.rmtree(aside, ignore_errors=True)
            removed += 1
    return removed
