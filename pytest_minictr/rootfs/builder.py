"""Minimal root filesystems built from host binaries, files and directories, and cached.

``RootfsBuilder(cache_dir).build(binaries=, files=, dirs=)`` returns a complete, world-readable
directory holding each input at the SAME path as on the host, plus every library ``ldd`` lists
for each binary and the loader, the interpreter of each ``#!`` script, the host's merged-/usr
links (``/bin -> usr/bin``...) and a skeleton (``/proc /dev /sys /tmp /etc /root...``,
``/etc/passwd group hosts nsswitch.conf``; copied files win).  Host symlinks met on the way are
recreated as symlinks; setuid/setgid bits are dropped.  Results are cached in
``cache_dir/<key>/rootfs``, their manifest beside it (see `cache`): a hit costs a manifest read
and an lstat per copied host file, no subprocess; a stale entry (a library was upgraded) is
rebuilt and swapped in, the old one renamed to ``<key>.stale-<random>`` for a later prune.
Entries appear atomically (built in ``.tmp-<key>-<pid>-<random>``, renamed), so concurrent
builders (pytest-xdist) never see half an entry and all get the same path.
``dest=`` builds into an absent or empty directory instead, without the cache.  Missing
binaries, libraries or interpreters raise RootfsError; malformed arguments raise ConfigError
before anything is touched.  Give only trusted host binaries: ``ldd`` may run their loader.

Here: the request, its inputs found on the host, and the build. What a binary needs is found
by `closure`, copied by `tree`; cache entries are checked and published by `cache`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_minictr.errors import ConfigError, RootfsError
from pytest_minictr.host.idmap import shift_ownership
from pytest_minictr.rootfs import recipe as recipes
from pytest_minictr.rootfs.cache import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SourceStat,
    default_cache_dir,
    is_fresh,
    publish,
    remove_dead_temp_dirs,
    rootfs_of,
    write_image_config,
    write_manifest,
)
from pytest_minictr.rootfs.closure import (
    LD_SO_CACHE,
    env_command,
    find_library,
    not_on_path,
    parse_shebang,
    probe_python,
)
from pytest_minictr.rootfs.tree import RootTree
from pytest_minictr.spec import DEFAULT_PATH

__all__ = ["LD_SO_CACHE", "MANIFEST_NAME", "MERGED_USR_LINKS", "RootTree", "RootfsBuilder",
           "default_cache_dir", "env_command", "parse_shebang"]

MERGED_USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
SKELETON_DIRS = {"proc": 0o755, "dev": 0o755, "sys": 0o755, "tmp": 0o1777, "etc": 0o755,
                 "root": 0o700, "home": 0o755, "run": 0o755, "var": 0o755, "var/tmp": 0o1777,
                 "usr": 0o755, "usr/bin": 0o755, "bin": 0o755}  # bin: only if not a link
SKELETON_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
                  "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}


@dataclass(frozen=True)
class ResolvedInput:
    """One requested binary/file/dir: as named, where it is on the host, what it really is."""
    kind: str  # "binary" | "file" | "dir"
    name: str
    path: str
    real: SourceStat


@dataclass(frozen=True)
class Request:
    binaries: tuple[str, ...]
    files: tuple[str, ...]
    dirs: tuple[str, ...]
    libraries: tuple[str, ...] = ()   # sonames loaded at run time, found in LIBRARY_DIRS
    python: str | None = None         # an interpreter whose stdlib comes along
    applets: str | None = None        # a busybox whose applets get links in /bin
    recipe: str = ""                  # the recipe's name, for `minictr rootfs list`
    command: tuple[str, ...] = ()     # the recipe's default command (see cache.image_command)


def _normalize(kind: str, items: Any) -> tuple[str, ...]:
    if isinstance(items, (str, bytes, os.PathLike)):
        raise ConfigError(f"{kind} must be a list, not the single value {items!r}; "
                          f"write {kind}=[{items!r}]")
    try:
        items = list(items)
    except TypeError:
        raise ConfigError(f"{kind} must be a list of str or os.PathLike, got {items!r}") from None
    names = set()
    for item in items:
        name = _path_str(item, f"{kind} item {item!r}")
        # Bare binary names are looked up on PATH; everything else is a host path.
        names.add(name if (kind == "binaries" and "/" not in name) or os.path.isabs(name)
                  else os.path.join(os.getcwd(), name))
    return tuple(sorted(names))


def _path_str(item: Any, what: str) -> str:
    name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
    if not isinstance(name, str) or not name or "\0" in name:
        raise ConfigError(f"{what} must be a non-empty str or os.PathLike without NUL bytes")
    try:
        # What the kernel gets; a lone surrogate ('\\ud800') would raise UnicodeEncodeError
        # from the first os.stat() deep inside the build.
        os.fsencode(name)
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what}: {name[e.start:e.end]!r} at index {e.start} cannot be "
                          f"encoded for the kernel ({e.reason})") from None
    return name


def normalize_dest(dest: Any) -> str:
    path = os.path.abspath(_path_str(dest, f"dest={dest!r}"))
    try:
        usable = not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path))
    except OSError as e:
        raise RootfsError(f"dest {path!r}: cannot look into it ({_describe(e)})") from None
    if not usable:
        raise ConfigError(f"dest {path!r} must not exist or be an empty directory")
    return path


def _describe(error: OSError) -> str:
    """'Permission denied: /x' from an OSError: the errno text and the path it is about."""
    text = error.strerror or str(error)
    return f"{text}: {error.filename}" if error.filename else text


def _resolve(kind: str, name: str, search_path: str) -> ResolvedInput:
    path = find_library(name) if kind == "library" else name
    if kind == "binary" and "/" not in name:
        found = _which(name, search_path)
        if found is None:
            raise not_on_path(f"binary {name!r}")
        path = os.path.join(os.getcwd(), found)  # a relative PATH entry gives a relative path
    real = os.path.realpath(path)
    _check_copyable(kind, name, real)
    try:
        st = os.stat(real)
    except OSError as e:
        raise RootfsError(f"{kind} {name!r} not found on the host ({e.strerror})") from None
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        raise RootfsError(f"dir {name!r} is not a directory")
    if kind != "dir" and not stat.S_ISREG(st.st_mode):
        raise RootfsError(f"{kind} {name!r} is not a regular file (directories go in dirs=)")
    return ResolvedInput(kind, name, path, SourceStat.of(real, st))


def _which(name: str, search_path: str) -> str | None:
    """shutil.which() without its generality (PATHEXT, bytes, cwd first on Windows): one
    stat per PATH entry. It runs for every binary on every cache hit, where which() was most
    of a hit's cost."""
    for directory in search_path.split(os.pathsep):
        candidate = f"{directory or '.'}/{name}"
        try:
            if stat.S_ISREG(os.stat(candidate).st_mode) and os.access(candidate, os.X_OK):
                return candidate
        except (OSError, ValueError):
            continue
    return None


# The kernel's own trees: what reading them copies is live state (/proc/kmsg blocks until the
# kernel logs something), and a container gets its own /proc and /dev, and no /sys.
KERNEL_TREES = ("/proc", "/sys", "/dev")


def _check_copyable(kind: str, name: str, real: str) -> None:
    """Refuse what no rootfs should copy: the host's whole root, the kernel's trees."""
    if real == "/":
        raise RootfsError(f"{kind} {name!r} is the host's whole root: give the directories "
                          "the container needs")
    for tree in KERNEL_TREES:
        if real == tree or real.startswith(tree + "/"):
            raise RootfsError(f"{kind} {name!r} is in {tree}, the kernel's live state, not "
                              f"files to copy (a container gets its own /proc and /dev)")


def _resolve_all(request: Request, search_path: str) -> list[ResolvedInput]:
    # dirs first: copytree wants fresh ground, later single files then only fill gaps.
    return [_resolve(kind, name, search_path) for kind, names in
            (("dir", request.dirs), ("file", request.files), ("binary", request.binaries),
             ("library", request.libraries))
            for name in names]


def _cache_key(request: Request, resolved: list[ResolvedInput]) -> str:
    # Built by hand, not with asdict(): this runs on every cache hit and asdict deep-copies.
    material = repr((FORMAT_VERSION, request.binaries, request.files, request.dirs,
                     request.libraries, request.python, request.applets, request.command,
                     [(r.kind, r.name, r.path, r.real.path, r.real.dev, r.real.ino, r.real.size,
                       r.real.mtime_ns) for r in resolved]))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _populate(root: str, resolved: list[ResolvedInput], search_path: str,
              request: Request | None = None, link: bool = False) -> dict[str, SourceStat]:
    tree = RootTree(root, link)
    for name in MERGED_USR_LINKS:
        # /bin/sh must work even though which("sh") gave /usr/bin/sh.
        if os.path.islink("/" + name) and os.path.isdir("/" + name):
            tree.add_path("/" + name)
    for rel, mode in SKELETON_DIRS.items():
        tree.ensure_dir("/" + rel, mode)
    for item in resolved:
        if item.kind == "dir":
            tree.add_tree(item.path)
        elif item.kind == "file":
            tree.add_path(item.path)
        else:  # binary, library
            tree.add_binary_closure(item.path, search_path)
    if request is not None and request.python:
        tree.add_python(probe_python(request.python, search_path), search_path)
    if request is not None and request.applets:
        tree.add_applets(request.applets)
    for rel, content in SKELETON_FILES.items():
        if not os.path.lexists(tree.inside(rel)):
            with open(tree.inside(rel), "w") as f:
                f.write(content)
            os.chmod(tree.inside(rel), 0o644)
    return tree.sources


def _request(binaries: Any, files: Any, dirs: Any, recipe: recipes.Recipe | None) -> Request:
    if recipe is None:
        return Request(_normalize("binaries", binaries), _normalize("files", files),
                       _normalize("dirs", dirs))
    if recipe.applets and not os.path.isfile(recipe.applets):
        raise RootfsError(f"recipe {recipe.name!r} needs {recipe.applets}, which this host "
                          "lacks (Debian, Ubuntu: apt install busybox-static)")
    return Request(_normalize("binaries", [*recipe.binaries, *_as_list("binaries", binaries)]),
                   _normalize("files", [*recipe.files, *_as_list("files", files)]),
                   _normalize("dirs", [*recipe.dirs, *_as_list("dirs", dirs)]),
                   libraries=recipe.libraries, python=recipe.python, applets=recipe.applets,
                   recipe=recipe.name, command=recipe.command)


def _as_list(kind: str, items: Any) -> list[str]:
    return list(_normalize(kind, items)) if items else []


# (request, PATH, cache dir, cwd) -> the entry its names resolved to, earlier in this process.
# Resolving names on PATH was most of a cache hit (a stat per PATH entry and binary); the
# entry's manifest still has every copied file checked (is_fresh). What it misses, a program
# installed meanwhile earlier on PATH, shadowing the one copied, no long-lived user minds.
_resolved_before: dict[tuple, str] = {}


class RootfsBuilder:
    """Builds (and caches in `cache_dir`, default `default_cache_dir()`) root filesystems."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(os.path.abspath(cache_dir if cache_dir is not None
                                              else default_cache_dir()))

    def build(self, binaries: Any = (), files: Any = (), dirs: Any = (), dest: Any = None,
              recipe: Any = None) -> Path:
        """A rootfs holding `binaries` (names on PATH, or paths) with their libraries,
        `files` and `dirs` (host paths), plus what the `recipe` names (see `recipes`)."""
        request = _request(binaries, files, dirs, None if recipe is None else
                           recipes.load(recipe))
        dest = None if dest is None else normalize_dest(dest)
        search_path = os.environ.get("PATH") or DEFAULT_PATH
        memo_key = (request, search_path, self.cache_dir, os.getcwd())  # relative names
        if dest is None:
            known = _resolved_before.get(memo_key)
            if known is not None and is_fresh(known):
                return Path(rootfs_of(known))
        resolved = _resolve_all(request, search_path)
        if dest is not None:
            return self._build_into_dest(dest, request, resolved, search_path)
        entry = str(self.cache_dir / _cache_key(request, resolved))
        if is_fresh(entry):
            _resolved_before[memo_key] = entry
            return Path(rootfs_of(entry))
        try:
            return Path(rootfs_of(self._build_entry(entry, request, resolved, search_path)))
        except OSError as e:  # _build_entry removed its temp dir; nothing half-built is left
            raise RootfsError(f"cannot build the rootfs in cache_dir {str(self.cache_dir)!r} "
                              f"({_describe(e)}); pass another cache_dir= or set "
                              "MINICTR_CACHE_DIR") from None

    def _build_entry(self, entry: str, request: Request, resolved: list[ResolvedInput],
                     search_path: str) -> str:
        cache_dir, key = os.path.split(entry)
        os.makedirs(cache_dir, exist_ok=True)
        remove_dead_temp_dirs(cache_dir)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=cache_dir)
        try:
            root = rootfs_of(tmp)
            os.mkdir(root, 0o755)
            sources = _populate(root, resolved, search_path, request, link=True)
            if os.geteuid() == 0:
                shift_ownership(root)  # root inside owns it, with or without an idmap
            write_manifest(tmp, request, sources)
            publish(tmp, entry)  # the rootfs and its manifest appear together
            return entry
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _build_into_dest(self, dest: str, request: Request, resolved: list[ResolvedInput],
                         search_path: str) -> Path:
        created = make_dest(dest)
        try:
            _populate(dest, resolved, search_path, request)
            if request.command:
                write_image_config(dest, request.command, "recipe")
        except BaseException as error:
            clear_dest(dest, created)  # no half-built tree left behind
            if isinstance(error, OSError):
                raise RootfsError(f"dest {dest!r}: cannot build the rootfs there "
                                  f"({_describe(error)})") from None
            raise
        return Path(dest)


def make_dest(dest: str) -> str | None:
    """Create `dest` and its missing parents; return the top-most directory this created
    (None if `dest` was there), which is what a failure has to remove."""
    top, path = None, dest
    while not os.path.lexists(path):
        top, path = path, os.path.dirname(path)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        clear_dest(dest, top)  # parents made before the failing one
        raise RootfsError(f"dest {dest!r}: cannot create it ({_describe(e)})") from None
    return top


def clear_dest(dest: str, created: str | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    # An empty dir the caller gave us stays, with its owner and mode: only our files go.
    # Best effort: this runs while an error is raised, which must not be replaced.
    try:
        for name in os.listdir(dest):
            path = os.path.join(dest, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
    except OSError:
        pass
