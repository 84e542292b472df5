"""Copying host paths into a new root at the same paths: host symlinks recreated as
symlinks, setuid/setgid bits dropped, and with each binary what it needs to run (see
`closure`); every host file copied is noted for the cache's freshness check."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

from pytest_minictr.errors import RootfsError
from pytest_minictr.rootfs.cache import SourceStat
from pytest_minictr.rootfs.closure import (
    LD_SO_CACHE,
    LDD_TIMEOUT,
    STDLIB_LEFT_OUT,
    PythonLayout,
    ldd_libraries,
    ldd_many,
    script_interpreters,
)

MAX_SYMLINK_HOPS = 40  # the kernel's own limit (ELOOP) for path resolution


class RootTree:
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
                    raise RootfsError(f"cannot reach the file or directory {host_path!r}: too "
                                      "many levels of symlinks (a loop?)")
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
            for library in ldd_many(modules, search_path):
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
            interpreters = script_interpreters(binary, search_path)
            if interpreters is not None:
                pending.extend(interpreters)
                continue
            libraries = ldd_libraries(binary, search_path)
            for library in libraries:
                self.add_path(library)
            if libraries and os.path.isfile(LD_SO_CACHE):
                # Without it the loader only searches its built-in dirs and would miss
                # libraries that ldd found through /etc/ld.so.conf.d (e.g. /usr/local/lib).
                self.add_path(LD_SO_CACHE)
