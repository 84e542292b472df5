"""Minimal root filesystems built from host binaries, files and directories, and cached.

``RootfsBuilder(cache_dir).build(binaries=, files=, dirs=)`` returns a complete, world-readable
directory holding each input at the SAME path as on the host, plus every library ``ldd`` lists
for each binary and the loader, the interpreter of each ``#!`` script, the host's merged-/usr
links (``/bin -> usr/bin``...) and a skeleton (``/proc /dev /sys /tmp /etc /root...``,
``/etc/passwd group hosts nsswitch.conf``; copied files win).  Host symlinks met on the way are
recreated as symlinks; setuid/setgid bits are dropped.  Results are cached in ``cache_dir/<key>``:
a hit costs a manifest read and an lstat per copied host file, no subprocess; a stale entry (a
library was upgraded) is rebuilt and swapped in, the old one renamed to ``<key>.stale-<random>``
for a later prune.  Entries appear atomically (built in ``.tmp-<key>-<pid>-<random>``, renamed),
so concurrent builders (pytest-xdist) never see half an entry and all get the same path.
``dest=`` builds into an absent or empty directory instead, without the cache.  Missing
binaries, libraries or interpreters raise RootfsError; malformed arguments raise ConfigError
before anything is touched.  Give only trusted host binaries: ``ldd`` may run their loader.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pytest_minictr.errors import ConfigError, RootfsError
from pytest_minictr.host.idmap import shift_ownership
from pytest_minictr.rootfs import recipe as recipes
from pytest_minictr.spec import DEFAULT_PATH

FORMAT_VERSION = 2
MANIFEST_NAME = ".minictr-manifest.json"
MERGED_USR_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
MAX_SYMLINK_HOPS = 40  # the kernel's own limit (ELOOP) for path resolution
LDD_TIMEOUT = 60.0
SHEBANG_MAX = 256  # BINPRM_BUF_SIZE: the kernel only reads this much of a "#!" line
LD_SO_CACHE = "/etc/ld.so.cache"
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


@dataclass(frozen=True)
class PythonLayout:
    """Where an interpreter keeps itself, as it says when asked."""
    executable: str
    stdlib: str
    dynload: str


# Where the dynamic loader looks for libraries by default (Debian's multiarch dirs first).
LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
# Parts of a standard library no program under test needs: tests, GUIs, installers, the
# static libpython (config-*), third-party packages.
STDLIB_LEFT_OUT = ("site-packages", "dist-packages", "test", "idlelib", "tkinter",
                   "turtledemo", "ensurepip", "__phello__", "config-")
PYTHON_PROBE = ("import json, os, sys, sysconfig; print(json.dumps({"
                "'executable': os.path.realpath(sys.executable), "
                "'stdlib': sysconfig.get_paths()['stdlib'], "
                "'dynload': sysconfig.get_config_var('DESTSHARED') or ''}))")


def parse_shebang(head: bytes) -> tuple[str, str] | None:
    """(interpreter, optional single argument) of a "#!" line, split the way the kernel does:
    blanks after "#!" skipped, interpreter up to the next blank, the rest is ONE argument."""
    if not head.startswith(b"#!"):
        return None
    match = re.match(rb"[ \t]*([^ \t\n]*)[ \t]*([^\n]*)", head[2:SHEBANG_MAX])
    return os.fsdecode(match[1]), os.fsdecode(match[2].rstrip(b" \t"))


def env_command(arg: str) -> str | None:
    """The NAME that `#!/usr/bin/env [-S] [-u VAR] [VAR=val] NAME ...` will look up on PATH."""
    words = iter(arg.split())
    for word in words:
        if word in ("-u", "-C", "--unset", "--chdir"):
            next(words, None)
        elif not word.startswith("-") and "=" not in word:
            return word
    return None


def _normalize(kind: str, items) -> tuple[str, ...]:
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


def _path_str(item, what: str) -> str:
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


def normalize_dest(dest) -> str:
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
        path = shutil.which(name, path=search_path)
        if path is None:
            raise RootfsError(f"binary {name!r} not found on PATH ({search_path})")
        path = os.path.join(os.getcwd(), path)  # a relative PATH entry gives a relative path
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise RootfsError(f"{kind} {name!r} not found on the host ({e.strerror})") from None
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        raise RootfsError(f"dir {name!r} is not a directory")
    if kind != "dir" and not stat.S_ISREG(st.st_mode):
        raise RootfsError(f"{kind} {name!r} is not a regular file (directories go in dirs=)")
    return ResolvedInput(kind, name, path, SourceStat.of(real, st))


def _resolve_all(request: Request, search_path: str) -> list[ResolvedInput]:
    # dirs first: copytree wants fresh ground, later single files then only fill gaps.
    return [_resolve(kind, name, search_path) for kind, names in
            (("dir", request.dirs), ("file", request.files), ("binary", request.binaries),
             ("library", request.libraries))
            for name in names]


def _cache_key(request: Request, resolved: list[ResolvedInput]) -> str:
    # Built by hand, not with asdict(): this runs on every cache hit and asdict deep-copies.
    material = repr((FORMAT_VERSION, request.binaries, request.files, request.dirs,
                     request.libraries, request.python, request.applets,
                     [(r.kind, r.name, r.path, r.real.path, r.real.dev, r.real.ino, r.real.size,
                       r.real.mtime_ns) for r in resolved]))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


class _RootTree:
    """Copies host paths into `root` at the same path, mirroring host symlinks as symlinks.
    With `link`, a file is hard-linked where the filesystem allows (a cache entry, never
    written: the python3 recipe's four thousand files then cost a link each)."""

    def __init__(self, root: str, link: bool = False):
        self.root = root
        self.link = link
        self.sources: dict[str, SourceStat] = {}
        self._done: dict[str, str] = {}  # host path given -> physical host path
        self._trees: list[str] = []

    def inside(self, host: str) -> str:
        return os.path.join(self.root, host.lstrip("/"))

    def add_path(self, host_path: str) -> str:
        """Copy `host_path` (walking each component) and return its physical host path."""
        if host_path not in self._done:  # libc & co. are asked for by every binary
            try:
                self._done[host_path] = self._walk(host_path)
            except OSError as e:
                raise RootfsError(f"cannot copy {host_path!r} into the rootfs: {e}") from None
        return self._done[host_path]

    def _walk(self, host_path: str) -> str:
        parts = [p for p in host_path.split("/") if p not in ("", ".")]
        resolved, hops = "/", 0
        while parts:
            name = parts.pop(0)
            if name == "..":  # `resolved` holds no symlink, so going up lexically is exact
                resolved = os.path.dirname(resolved)
                continue
            host = os.path.join(resolved, name)
            st = os.lstat(host)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise RootfsError(f"too many levels of symlinks resolving {host_path!r}")
                target = os.readlink(host)
                self._link(host, target, st)
                # A relative target is relative to the link's directory, an absolute one is
                # taken inside the root: exactly how the container will resolve it.
                resolved = "/" if target.startswith("/") else resolved
                parts[:0] = [p for p in target.split("/") if p not in ("", ".")]
            elif stat.S_ISDIR(st.st_mode):
                self.ensure_dir(host)
                resolved = host
            elif stat.S_ISREG(st.st_mode) and not parts:
                self._copy_file(host, st)
                resolved = host
            else:
                raise RootfsError(f"{host!r} (in {host_path!r}) is not a directory or "
                                  f"regular file")
        return resolved

    def _link(self, host: str, target: str, st: os.stat_result) -> None:
        if not os.path.lexists(self.inside(host)):
            os.symlink(target, self.inside(host))
            self.sources[host] = SourceStat.of(host, st)

    def ensure_dir(self, host: str, mode: int = 0o755) -> None:
        if not os.path.lexists(self.inside(host)):
            os.mkdir(self.inside(host))
            os.chmod(self.inside(host), mode)  # explicit: mkdir's mode is masked by umask

    def _copy_file(self, host: str, st: os.stat_result, record: bool = True) -> None:
        dst = self.inside(host)
        if os.path.lexists(dst):  # never write through something already in the root
            return
        if record:
            self.sources[host] = SourceStat.of(host, st)  # stat before copying: errs on stale
        if self.link and not st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            try:
                os.link(host, dst)
                return
            except OSError:
                pass  # another filesystem, or fs.protected_hardlinks: copy it
        shutil.copy2(host, dst, follow_symlinks=False)
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            # A setuid-root copy in a cache outliving host security updates is a hazard,
            # and setuid means nothing to a user-namespace container anyway.
            os.chmod(dst, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))

    def add_tree(self, host_dir: str, left_out: tuple[str, ...] = ()) -> None:
        """Copy a directory tree but the top-level entries named (or prefixed) in `left_out`.
        The manifest records its directories, not each file: adding, removing or replacing
        a file (as package upgrades do) changes its directory; a cache hit stays cheap."""
        real = self.add_path(host_dir)
        if any(real == t or real.startswith(t + "/") for t in self._trees):
            return
        self._trees.append(real)
        try:
            for directory, subdirs, names in os.walk(real):
                if directory == real:
                    subdirs[:] = [d for d in subdirs if not d.startswith(left_out)] \
                        if left_out else subdirs
                self.sources[directory] = SourceStat.of(directory)
                self._copy_entries(directory, subdirs, names)
        except OSError as e:
            raise RootfsError(f"cannot copy directory {host_dir!r} into the rootfs: {e}") from None

    def _copy_entries(self, directory: str, subdirs: list[str], names: list[str]) -> None:
        """One directory's entries. Symlinks to directories come as symlinks (os.walk lists
        them among the subdirs but does not enter them); device nodes, FIFOs and sockets are
        left out: reading a FIFO would block, and a container cannot use host devices."""
        for name in list(subdirs):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                subdirs.remove(name)
                self._link(path, os.readlink(path), st)
            else:
                self.ensure_dir(path, stat.S_IMODE(st.st_mode))
        for name in names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                self._link(path, os.readlink(path), st)
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(path, st, record=False)

    def add_python(self, layout: PythonLayout, search_path: str) -> None:
        """An interpreter, its standard library, and what its extension modules load."""
        self.add_binary_closure(layout.executable, search_path)
        self.add_tree(layout.stdlib, STDLIB_LEFT_OUT)
        if layout.dynload and os.path.isdir(layout.dynload):
            self.add_tree(layout.dynload)
            modules = sorted(os.path.join(layout.dynload, name)
                             for name in os.listdir(layout.dynload) if name.endswith(".so"))
            for library in _ldd_many(modules, search_path):
                self.add_path(library)
        for name in ("python3", "python"):
            link = self.inside(f"/usr/bin/{name}")
            if not os.path.lexists(link):
                os.symlink(layout.executable, link)

    def add_applets(self, busybox: str) -> None:
        """A link in /bin for each applet this busybox lists (`busybox --list`)."""
        try:
            listed = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                                    timeout=LDD_TIMEOUT, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError) as e:
            raise RootfsError(f"{busybox} --list failed: {e}") from None
        for applet in listed:
            if "/" not in applet and applet not in (".", ".."):
                link = self.inside(f"/bin/{applet}")
                if not os.path.lexists(link):
                    os.symlink(busybox, link)

    def add_binary_closure(self, path: str, search_path: str) -> None:
        pending, seen = [path], set()
        while pending:
            binary = pending.pop()
            if binary in seen:
                continue
            seen.add(binary)
            self.add_path(binary)
            interpreters = _script_interpreters(binary, search_path)
            if interpreters is not None:
                pending.extend(interpreters)
                continue
            libraries = _ldd_libraries(binary, search_path)
            for library in libraries:
                self.add_path(library)
            if libraries and os.path.isfile(LD_SO_CACHE):
                # Without it the loader only searches its built-in dirs and would miss
                # libraries that ldd found through /etc/ld.so.conf.d (e.g. /usr/local/lib).
                self.add_path(LD_SO_CACHE)


def _script_interpreters(script: str, search_path: str) -> list[str] | None:
    """Host paths of what a "#!" script needs to be executed, or None if not a script."""
    with open(script, "rb") as f:
        shebang = parse_shebang(f.read(SHEBANG_MAX))
    if shebang is None:
        return None
    interp, arg = shebang
    if not os.path.isabs(interp) or not os.path.isfile(interp):
        raise RootfsError(f"script {script!r} needs interpreter {interp!r}, which is not an "
                          f"existing absolute path on the host")
    if os.path.basename(interp) != "env":
        return [interp]
    name = env_command(arg)
    found = shutil.which(name, path=search_path) if name else None
    if found is None:
        raise RootfsError(f"script {script!r} needs interpreter {name or arg!r} (via {interp}), "
                          f"not found on PATH ({search_path})")
    return [interp, found]


def _ldd_libraries(binary: str, search_path: str) -> list[str]:
    """Libraries and loader of a dynamic binary; [] for a static one."""
    ldd = shutil.which("ldd", path=f"{search_path}:{DEFAULT_PATH}")
    if ldd is None:
        raise RootfsError("ldd not found on the host; install libc-bin (glibc) to build rootfs")
    # ldd may execute the binary's own loader (PT_INTERP) to trace it: only trusted host
    # binaries belong here.  A minimal env so LD_LIBRARY_PATH/LD_PRELOAD, absent in the
    # container, do not make libraries appear found; LC_ALL=C to parse stable messages.
    try:
        proc = subprocess.run([ldd, binary], capture_output=True, timeout=LDD_TIMEOUT,
                              encoding="utf-8", errors="surrogateescape",  # = os.fsdecode
                              env={"LC_ALL": "C", "PATH": f"{search_path}:{DEFAULT_PATH}"})
    except subprocess.TimeoutExpired:
        raise RootfsError(f"ldd {binary!r} did not finish within {LDD_TIMEOUT:g} s") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:  # static binaries make (glibc's) ldd exit 1
        if "not a dynamic executable" in output or "statically linked" in output:
            return []
        raise RootfsError(f"ldd {binary!r} failed (exit {proc.returncode}): {output.strip()}")
    libraries = []
    for line in proc.stdout.splitlines():
        # "libc.so.6 => /lib/.../libc.so.6 (0x..)", "/lib64/ld-linux-x86-64.so.2 (0x..)",
        # "libfoo.so => not found", "linux-vdso.so.1 (0x..)" (the kernel provides that one).
        soname, _, where = line.strip().rpartition("=>")
        path = where.strip().split(" (0x", 1)[0]
        if path == "not found":
            raise RootfsError(f"binary {binary!r} needs library {soname.strip()!r}, which ldd "
                              f"reports as not found")
        if path.startswith("/"):
            libraries.append(path)
    return libraries


def _ldd_many(binaries: list[str], search_path: str) -> set[str]:
    """The libraries of many binaries, one ldd run for all (extension modules: seventy of
    them in one run instead of seventy runs). One whose library is missing on the host could
    not be imported there either: it is left as it is, not an error."""
    if not binaries:
        return set()
    ldd = shutil.which("ldd", path=f"{search_path}:{DEFAULT_PATH}")
    if ldd is None:
        raise RootfsError("ldd not found on the host; install libc-bin (glibc) to build rootfs")
    try:
        proc = subprocess.run([ldd, *binaries], capture_output=True, timeout=LDD_TIMEOUT,
                              encoding="utf-8", errors="surrogateescape",
                              env={"LC_ALL": "C", "PATH": f"{search_path}:{DEFAULT_PATH}"})
    except subprocess.TimeoutExpired:
        raise RootfsError(f"ldd of {len(binaries)} modules did not finish within "
                          f"{LDD_TIMEOUT:g} s") from None
    libraries = set()
    for line in proc.stdout.splitlines():
        path = line.strip().rpartition("=>")[2].strip().split(" (0x", 1)[0]
        if line.startswith(("\t", " ")) and path.startswith("/"):
            libraries.add(path)
    return libraries


def find_library(soname: str) -> str:
    for directory in LIBRARY_DIRS:
        path = os.path.join(directory, soname)
        if os.path.isfile(path):
            return path
    raise RootfsError(f"library {soname!r} not found in {', '.join(LIBRARY_DIRS)}")


def probe_python(interpreter: str, search_path: str) -> PythonLayout:
    """Ask the interpreter (a name on PATH, a path, a pyenv shim) where it keeps itself."""
    found = interpreter if "/" in interpreter else shutil.which(interpreter, path=search_path)
    if found is None:
        raise RootfsError(f"python {interpreter!r} not found on PATH ({search_path})")
    try:
        done = subprocess.run([found, "-I", "-S", "-c", PYTHON_PROBE], capture_output=True,
                              text=True, timeout=LDD_TIMEOUT, check=True)
        return PythonLayout(**json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError, TypeError) as e:
        raise RootfsError(f"python {interpreter!r} could not say where its standard library "
                          f"is: {e}") from None


def _populate(root: str, resolved: list[ResolvedInput], search_path: str,
              request: Request | None = None, link: bool = False) -> dict[str, SourceStat]:
    tree = _RootTree(root, link)
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


def _write_manifest(root: str, request: Request, sources: dict[str, SourceStat]) -> None:
    # Written last: its presence marks a complete tree (only renamed dirs are read anyway).
    manifest = {"format": FORMAT_VERSION, "inputs": asdict(request),
                "sources": [asdict(s) for s in sources.values()]}
    with open(os.path.join(root, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=0)
    os.chmod(os.path.join(root, MANIFEST_NAME), 0o644)
    os.chmod(root, 0o755)  # mkdtemp made it 0700; containers in a userns must read it


def _is_fresh(entry: str) -> bool:
    """Every host file copied into `entry` is still the very same one (the cache-hit path)."""
    try:
        with open(os.path.join(entry, MANIFEST_NAME), "rb") as f:
            manifest = json.load(f)
        if manifest["format"] != FORMAT_VERSION:
            return False
        for source in manifest["sources"]:
            st = os.lstat(source["path"])
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
                    source["dev"], source["ino"], source["size"], source["mtime_ns"]):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_dead_temp_dirs(cache_dir: str) -> None:
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


def _request(binaries, files, dirs, recipe: recipes.Recipe | None) -> Request:
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
                   recipe=recipe.name)


def _as_list(kind: str, items) -> list:
    return list(_normalize(kind, items)) if items else []


class RootfsBuilder:
    """Builds (and caches in `cache_dir`, default `default_cache_dir()`) root filesystems."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(os.path.abspath(cache_dir if cache_dir is not None
                                              else default_cache_dir()))

    def build(self, binaries=(), files=(), dirs=(), dest=None, recipe=None) -> Path:
        """A rootfs holding `binaries` (names on PATH, or paths) with their libraries,
        `files` and `dirs` (host paths), plus what the `recipe` names (see `recipes`)."""
        request = _request(binaries, files, dirs, None if recipe is None else
                           recipes.load(recipe))
        dest = None if dest is None else normalize_dest(dest)
        search_path = os.environ.get("PATH") or DEFAULT_PATH
        resolved = _resolve_all(request, search_path)
        if dest is not None:
            return self._build_into_dest(dest, request, resolved, search_path)
        entry = str(self.cache_dir / _cache_key(request, resolved))
        if _is_fresh(entry):
            return Path(entry)
        try:
            return Path(self._build_entry(entry, request, resolved, search_path))
        except OSError as e:  # _build_entry removed its temp dir; nothing half-built is left
            raise RootfsError(f"cannot build the rootfs in cache_dir {str(self.cache_dir)!r} "
                              f"({_describe(e)}); pass another cache_dir= or set "
                              "MINICTR_CACHE_DIR") from None

    def _build_entry(self, entry: str, request: Request, resolved: list[ResolvedInput],
                     search_path: str) -> str:
        cache_dir, key = os.path.split(entry)
        os.makedirs(cache_dir, exist_ok=True)
        _remove_dead_temp_dirs(cache_dir)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=cache_dir)
        try:
            _write_manifest(tmp, request, _populate(tmp, resolved, search_path, request,
                                                    link=True))
            if os.geteuid() == 0:
                shift_ownership(tmp)  # root inside owns it, with or without an idmap
            if _rename_in(tmp, entry):
                return entry
            # Either a concurrent builder won the race (use theirs), or the entry is stale.
            if not _is_fresh(entry):
                # Renamed aside, not deleted: running containers may still use the old tree.
                try:
                    os.rename(entry, f"{entry}.stale-{secrets.token_hex(4)}")
                except FileNotFoundError:
                    pass  # another builder moved it aside first
                if _rename_in(tmp, entry):
                    return entry
            shutil.rmtree(tmp)
            return entry
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _build_into_dest(self, dest: str, request: Request, resolved: list[ResolvedInput],
                         search_path: str) -> Path:
        created = make_dest(dest)
        try:
            _write_manifest(dest, request, _populate(dest, resolved, search_path, request))
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
