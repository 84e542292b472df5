"""The rootfs cache: where entries live, the manifest that marks one complete and lists the
host files it copied, the freshness check of a cache hit, and atomic publication.

Entries appear atomically (built in ``.tmp-<key>-<pid>-<random>``, renamed), so concurrent
builders (pytest-xdist) never see half an entry and all get the same path; a stale entry is
renamed to ``<key>.stale-<random>`` for a later prune. Its upkeep: `cache_entries()` (what
`minictr rootfs list` shows) and `prune()`.
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
from typing import TYPE_CHECKING

from pytest_minictr.errors import MinictrError

if TYPE_CHECKING:
    from pytest_minictr.rootfs.builder import Request

FORMAT_VERSION = 2
MANIFEST_NAME = ".minictr-manifest.json"


def default_cache_dir() -> Path:
    """$MINICTR_CACHE_DIR, else $XDG_CACHE_HOME/minictr, else ~/.cache/minictr."""
    if os.environ.get("MINICTR_CACHE_DIR"):
        return Path(os.environ["MINICTR_CACHE_DIR"]).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return Path(xdg, "minictr")
    return Path.home() / ".cache" / "minictr"


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


def write_manifest(root: str, request: Request, sources: dict[str, SourceStat]) -> None:
    # Written last: its presence marks a complete tree (only renamed dirs are read anyway).
    manifest = {"format": FORMAT_VERSION, "inputs": asdict(request),
                "sources": [asdict(s) for s in sources.values()]}
    with open(os.path.join(root, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=0)
    os.chmod(os.path.join(root, MANIFEST_NAME), 0o644)
    os.chmod(root, 0o755)  # mkdtemp made it 0700; containers in a userns must read it


def image_command(root: str) -> tuple[str, ...]:
    """The default command a recipe declared for the rootfs `root` (docker's CMD); () if it
    has none, or is no rootfs we built."""
    try:
        with open(os.path.join(root, MANIFEST_NAME), "rb") as f:
            return tuple(json.load(f)["inputs"].get("command") or ())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ()


# manifest path -> (its identity, what it says of each source): a manifest is written once,
# and parsing a recipe's (python3: 188 sources) was a third of a cache hit
_manifests: dict[str, tuple[tuple, list[tuple[str, tuple[int, int, int, int]]]]] = {}


def is_fresh(entry: str) -> bool:
    """Every host file copied into `entry` is still the very same one (the cache-hit path)."""
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
    """Make the complete tree `tmp` the cache's `entry`, or drop it for an equal one there.

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
    path: str


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
                                  time.time() - manifest.stat().st_mtime, str(entry)))
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
