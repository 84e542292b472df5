"""What a binary needs to run, found without running it ourselves: the libraries and loader
`ldd` lists, the interpreter of a "#!" script (split as the kernel splits it), the libraries
named by soname, and where a Python interpreter keeps its standard library.

Give only trusted host binaries: glibc's `ldd` may run a binary's own loader to trace it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from pytest_minictr.errors import RootfsError
from pytest_minictr.spec import DEFAULT_PATH

LDD_TIMEOUT = 60.0
SHEBANG_MAX = 256  # BINPRM_BUF_SIZE: the kernel only reads this much of a "#!" line
LD_SO_CACHE = "/etc/ld.so.cache"


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
    assert match is not None  # every group may be empty: it matches any text
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


def script_interpreters(script: str, search_path: str) -> list[str] | None:
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
        raise not_on_path(f"script {script!r} needs interpreter {name or arg!r} (via "
                          f"{interp}), which is")
    return [interp, found]


def ldd_libraries(binary: str, search_path: str) -> list[str]:
    """Libraries and loader of a dynamic binary; [] for a static one."""
    done = _run_ldd([binary], search_path, repr(binary))
    output = done.stdout + done.stderr
    if done.returncode != 0:  # static binaries make (glibc's) ldd exit 1
        if "not a dynamic executable" in output or "statically linked" in output:
            return []
        raise RootfsError(f"ldd {binary!r} failed (exit {done.returncode}): {output.strip()}")
    libraries = []
    for line in done.stdout.splitlines():
        soname, path = _ldd_line(line)
        if path == "not found":
            raise RootfsError(f"binary {binary!r} needs library {soname!r}, which ldd "
                              f"reports as not found")
        if path.startswith("/"):
            libraries.append(path)
    return libraries


def ldd_many(binaries: list[str], search_path: str) -> set[str]:
    """The libraries of many binaries, one ldd run for all (extension modules: seventy of
    them in one run instead of seventy runs). One whose library is missing on the host could
    not be imported there either: it is left as it is, not an error."""
    if not binaries:
        return set()
    done = _run_ldd(binaries, search_path, f"of {len(binaries)} modules")
    # With several binaries ldd heads each one's list with "NAME:", its libraries indented.
    return {path for line in done.stdout.splitlines() if line.startswith(("\t", " "))
            for _, path in [_ldd_line(line)] if path.startswith("/")}


def _run_ldd(binaries: list[str], search_path: str, what: str) -> subprocess.CompletedProcess:
    ldd = shutil.which("ldd", path=f"{search_path}:{DEFAULT_PATH}")
    if ldd is None:
        raise RootfsError("ldd not found on the host; install libc-bin (glibc) to build rootfs")
    # ldd may execute the binary's own loader (PT_INTERP) to trace it: only trusted host
    # binaries belong here.  A minimal env so LD_LIBRARY_PATH/LD_PRELOAD, absent in the
    # container, do not make libraries appear found; LC_ALL=C to parse stable messages.
    try:
        return subprocess.run([ldd, *binaries], capture_output=True, timeout=LDD_TIMEOUT,
                              encoding="utf-8", errors="surrogateescape",  # = os.fsdecode
                              env={"LC_ALL": "C", "PATH": f"{search_path}:{DEFAULT_PATH}"})
    except subprocess.TimeoutExpired:
        raise RootfsError(f"ldd {what} did not finish within {LDD_TIMEOUT:g} s") from None


def _ldd_line(line: str) -> tuple[str, str]:
    """(soname, path) of one line of ldd's list: "libc.so.6 => /lib/.../libc.so.6 (0x..)",
    "/lib64/ld-linux-x86-64.so.2 (0x..)", "libfoo.so => not found", "linux-vdso.so.1 (0x..)"
    (the kernel provides that one: no path)."""
    soname, _, where = line.strip().rpartition("=>")
    return soname.strip(), where.strip().split(" (0x", 1)[0]


def find_library(soname: str) -> str:
    for directory in LIBRARY_DIRS:
        path = os.path.join(directory, soname)
        if os.path.isfile(path):
            return path
    raise RootfsError(f"library {soname!r} not found in {', '.join(LIBRARY_DIRS)}")


def not_on_path(what: str) -> RootfsError:
    """`what` was looked for on PATH in vain. The message leaves PATH out: a developer's
    holds a dozen directories (shims, toolchains), and the missing name is what matters."""
    return RootfsError(f"{what} not found on this host's PATH: install it, or give its path")


def probe_python(interpreter: str, search_path: str) -> PythonLayout:
    """Ask the interpreter (a name on PATH, a path, a pyenv shim) where it keeps itself."""
    found = interpreter if "/" in interpreter else shutil.which(interpreter, path=search_path)
    if found is None:
        raise not_on_path(f"python {interpreter!r}")
    try:
        done = subprocess.run([found, "-I", "-S", "-c", PYTHON_PROBE], capture_output=True,
                              text=True, timeout=LDD_TIMEOUT, check=True)
        return PythonLayout(**json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError, TypeError) as e:
        raise RootfsError(f"python {interpreter!r} could not say where its standard library "
                          f"is: {e}") from None
