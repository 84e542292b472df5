"""Rootfs recipes: declarative TOML files naming what a rootfs holds, for
`RootfsBuilder().build(recipe="python3")`, the marker's `recipe=` and `--recipe`.

    description = "..."
    binaries = ["sh", "/bin/busybox"]   # with every library ldd finds for them
    files = ["/etc/ssl/certs/ca-certificates.crt"]
    dirs = ["/usr/share/zoneinfo"]
    libraries = ["libgcc_s.so.1"]       # loaded at run time (dlopen): ldd cannot see them
    python = "python3"                  # this interpreter, its stdlib and extension modules
    applets = "/bin/busybox"            # a link in /bin for each applet of this busybox
    command = ["redis-server"]          # the default command of a container on this rootfs
    package = "redis-server"            # the Debian package that installs what it names
    matching = ["/usr/include/*.h"]     # every host path matching: files, or dirs' trees
    compile = ["gcc", "main.c"]         # a grading job's default build, then its run
    run = ["./a.out"]

A path may hold `*` where a version goes (`/usr/lib/postgresql/*/bin/postgres`): the newest
installed version is taken; `A|B` takes the first place that exists (gcc's cc1 is under
/usr/lib/gcc up to Debian 12, /usr/libexec/gcc from 13). What a recipe names but the host
lacks is a RootfsError that names `package`, the fix.

A recipe is a path (`x.toml`, or any name with a '/'), or a name looked up in the directories
of $MINICTR_RECIPE_PATH (':'-separated), then in the package's own `rootfs/recipes/`
(`minimal`, `busybox`, `python3`). TOML comes from the standard library from 3.11; on 3.10 a
reader for the subset above (strings, lists of strings, comments) stands in.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_minictr.errors import ConfigError, RootfsError

BUILTIN_DIR = Path(__file__).parent / "recipes"
KEYS = {"description": str, "binaries": list, "files": list, "dirs": list, "libraries": list,
        "python": str, "applets": str, "command": list, "package": str, "matching": list,
        "compile": list, "run": list}


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    description: str = ""
    binaries: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    python: str | None = None
    applets: str | None = None
    command: tuple[str, ...] = ()
    package: str | None = None
    compile: tuple[str, ...] = ()
    run: tuple[str, ...] = ()


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("MINICTR_RECIPE_PATH", "").split(":") if p]
    return [*extra, BUILTIN_DIR]


def available() -> list[str]:
    names = {p.stem for directory in search_path() if directory.is_dir()
             for p in directory.glob("*.toml")}
    return sorted(names)


def find(recipe: Any) -> Path:
    if not isinstance(recipe, (str, os.PathLike)) or not os.fspath(recipe):
        raise ConfigError(f"recipe={recipe!r}: expected a recipe name ({', '.join(available())})"
                          " or the path of a .toml file")
    text = os.fspath(recipe)
    if "/" in text or text.endswith(".toml"):
        path = Path(text)
        if not os.path.isfile(path):  # (Path.is_file raises on a name too long)
            raise ConfigError(f"recipe={text!r}: no such file")
        return path
    for directory in search_path():
        path = directory / f"{text}.toml"
        if os.path.isfile(path):
            return path
    raise ConfigError(f"recipe={text!r}: no such recipe (known: {', '.join(available())}; "
                      "or give a path, or add a directory to MINICTR_RECIPE_PATH)")


# path -> (its mtime_ns and size, the Recipe): parsing TOML was a tenth of a cache hit
_loaded: dict[str, tuple[tuple[int, int], Recipe]] = {}


def load(recipe: Any) -> Recipe:
    path = find(recipe)
    try:
        st = os.stat(path)
    except OSError as error:
        raise ConfigError(f"recipe {str(path)!r}: cannot read it ({error})") from None
    version = (st.st_mtime_ns, st.st_size)
    known = _loaded.get(str(path))
    if known is not None and known[0] == version:
        return known[1]
    loaded = _parse(path)
    _loaded[str(path)] = (version, loaded)
    return loaded


def _parse(path: Path) -> Recipe:
    try:
        data = parse_toml(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"recipe {str(path)!r}: cannot read it ({error})") from None
    for key, value in data.items():
        expected = KEYS.get(key)
        if expected is None:
            raise ConfigError(f"recipe {str(path)!r}: unknown key {key!r} "
                              f"(known: {', '.join(KEYS)})")
        if not isinstance(value, expected) or (expected is list and not all(
                isinstance(item, str) and (item or key == "command") for item in value)):
            what = "a list of strings" if expected is list else "a string"
            raise ConfigError(f"recipe {str(path)!r}: {key} = {value!r}: expected {what}")
    recipe = Recipe(name=path.stem, path=str(path), description=data.get("description", ""),
                    **{key: tuple(data.get(key, ())) for key in ("binaries", "files", "dirs",
                                                                 "libraries", "command",
                                                                 "compile", "run")},
                    python=data.get("python"), applets=data.get("applets"),
                    package=data.get("package"))
    return with_matches(with_versions_found(recipe), data.get("matching", ()))


def with_versions_found(recipe: Recipe) -> Recipe:
    """The recipe with each `*` path replaced by the newest version installed; RootfsError
    naming the package where something it names is not on this host."""
    found = {key: tuple(_installed(recipe, item) for item in getattr(recipe, key))
             for key in ("binaries", "files", "dirs")}
    return Recipe(**{**vars(recipe), **found})


def with_matches(recipe: Recipe, patterns: list[str]) -> Recipe:
    """The recipe with every host path matching each pattern added: a file to `files`, a
    directory (its whole tree) to `dirs`. (A `*` in `files` or `dirs` takes one version.)"""
    found = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    return Recipe(**{**vars(recipe),
                     "files": (*recipe.files, *(p for p in found if not os.path.isdir(p))),
                     "dirs": (*recipe.dirs, *(p for p in found if os.path.isdir(p)))})


def _installed(recipe: Recipe, item: str) -> str:
    for choice in item.split("|"):
        found = _installed_choice(choice)
        if found is not None:
            return found
    if recipe.package is None:
        return item  # the builder names what is missing
    raise RootfsError(f"recipe {recipe.name!r} needs {item}, which this host lacks: install "
                      f"the Debian package {recipe.package} (apt-get install "
                      f"{recipe.package})")


def _installed_choice(item: str) -> str | None:
    if "*" in item:
        matches = sorted(glob.glob(item), key=_version_order)
        return matches[-1] if matches else None
    return item if (shutil.which(item) if "/" not in item else os.path.exists(item)) else None


def _version_order(path: str) -> list:
    """'/usr/lib/postgresql/15/...' after '/usr/lib/postgresql/9.6/...'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", path)]


def parse_toml(text: str) -> dict:
    try:
        import tomllib  # novermin (3.10 falls back below)
    except ModuleNotFoundError:  # Python 3.10
        return parse_toml_subset(text)
    return tomllib.loads(text)


def parse_toml_subset(text: str) -> dict:
    """`key = value` lines, value a string or a (multi-line) list of strings, `#` comments on
    lines of their own or after a value: what recipes use, as JSON reads it."""
    data, pending = {}, ""
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = _without_comment(raw_line).strip()
        if not line:
            continue
        pending = f"{pending} {line}" if pending else line
        key, sep, value = pending.partition("=")
        if not sep:
            raise ValueError(f"line {number}: expected key = value")
        if value.count("[") > value.count("]"):
            continue  # a list goes on
        try:
            data[key.strip()] = json.loads(re.sub(r",\s*\]", "]", value.strip()))
        except ValueError:
            raise ValueError(f"line {number}: unreadable value {value.strip()!r}") from None
        pending = ""
    if pending:
        raise ValueError("unterminated list at the end")
    return data


def _without_comment(line: str) -> str:
    quoted = False
    for index, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[:index]
    return line
