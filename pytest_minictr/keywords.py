"""The container keywords, declared once: name, check, help, default, and where each is spelled.

Every front end reads this table: the `container` marker (its registration line, its unknown
keyword error), the `--minictr-*` options with their ini keys and `MINICTR_*` variables, the
flags of `minictr run`, and the keywords of `ContainerRuntime.run()`. Each front end checks a
value once, naming it as its user spelled it (`memory=`, `--minictr-memory=`, `--memory=`,
`memory_limit=`), into the value `spec.spec_from()` puts into the frozen `ContainerSpec`.
`ContainerRuntime.run()` takes the marker's names too (`memory=` as `memory_limit=`), and an
unknown keyword is matched against every spelling of every keyword for a "did you mean".
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, make_dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from pytest_minictr import confinement, ports, sizes, validate
from pytest_minictr.errors import ConfigError
from pytest_minictr.keyword_values import (
    PULL_POLICIES,
    Check,
    as_given,
    check_entrypoint,
    check_image,
    check_pull,
    env_item,
    env_of,
    number,
    pair,
    soft_hard,
)
from pytest_minictr.spec import DEFAULT_ENV, DEFAULT_OUTPUT_LIMIT, ContainerSpec, Limits, Security

F = TypeVar("F", bound=Callable[..., Any])


def _check_recipe(value: Any, name: str) -> str:
    """A recipe the rootfs builder can find; ConfigError names an unknown one."""
    # imported here: a rootfs build's module (glob, shutil, TOML), not the schema's to pay for
    from pytest_minictr.rootfs.recipe import find
    find(value)
    return str(value)


@dataclass(frozen=True)
class Flag:
    """How `minictr run` spells a keyword."""

    names: tuple[str, ...]
    action: str = "store"                # or "append" (repeatable), "store_false" (--no-x)
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    collect: Callable[[list[Any]], Any] = tuple  # a repeated flag's items, as the keyword's value
    help: str | None = None              # where the flag reads unlike the keyword (--no-x)


@dataclass(frozen=True)
class Keyword:
    """One container keyword. `name` is the marker's and the settings' name; `library` the
    keyword of ContainerRuntime.run() (None: not there); `from_text` turns an option's or a
    flag's text into what `check` takes."""

    name: str
    check: Check
    help: str
    default: Any = None
    nullable: bool = True          # None stands for the default (no limit), unchecked
    marker: bool = True
    option: bool = False           # --minictr-NAME, ini minictr_NAME, MINICTR_NAME
    library: str | None = None
    flag: Flag | None = None
    from_text: Check = as_given
    legacy: tuple[tuple[str, Check], ...] = ()  # older library names, each with its own unit
    instead: str = ""              # where a keyword the library lacks goes there

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every name a user may write for it somewhere, as a keyword would spell it."""
        flags = self.flag.names if self.flag is not None else ()
        return (self.name, *filter(None, [self.library]), *(name for name, _ in self.legacy),
                *(f"minictr_{self.name}",) * self.option,
                *(flag.lstrip("-").replace("-", "_") for flag in flags if flag[1] == "-"))

    def validate(self, value: Any, spelled: str) -> Any:
        if value is None and self.nullable:
            return self.default
        return self.check(value, spelled)


KEYWORDS = (
    Keyword("memory", validate.check_memory_limit, "memory limit, e.g. 64M or 1G (swap "
            "excluded)", option=True, library="memory_limit", flag=Flag(("--memory",))),
    Keyword("cpus", validate.parse_cpus, "CPU limit in CPUs, like docker: 0.5 is half of one "
            "CPU", option=True, library="cpus", flag=Flag(("--cpus",)),
            from_text=number(validate.EXPECTED_CPUS, keep_text=True),
            legacy=(("cpu_limit", validate.check_cpu_percent),)),
    Keyword("pids", validate.check_pids_limit, "most processes and threads alive at once",
            option=True, library="pids_limit", flag=Flag(("--pids",)),
            from_text=number("a positive integer", int)),
    Keyword("timeout", validate.check_seconds, "seconds of wall time, then the whole container "
            "is killed", option=True, library="timeout", flag=Flag(("--timeout",)),
            from_text=number("a positive number of seconds")),
    Keyword("cpu_time", validate.check_seconds, "seconds of CPU the command and all it starts "
            "may use together (the cgroup's count), then all is killed", option=True,
            library="cpu_time_limit", flag=Flag(("--cpu-time",)),
            from_text=number("a positive number of seconds")),
    Keyword("network", validate.check_network, "none: no interface up; loopback: lo up "
            "(default); never the host's network", default="loopback", nullable=False,
            library="network", flag=Flag(("--network",), choices=validate.NETWORK_MODES)),
    Keyword("binaries", validate.check_binaries, "host programs (with their libraries) the "
            "rootfs holds", instead="build the image: RootfsBuilder().build(binaries=[...])"),
    Keyword("recipe", _check_recipe, "build the rootfs from this recipe (minimal, busybox, "
            "python3, or a .toml path)", instead="build the image: RootfsBuilder().build("
            "recipe=...)"),
    Keyword("rootfs", validate.check_prepared_rootfs, "a prepared rootfs directory to run on "
            "instead of one built from host binaries", option=True,
            instead="the image is run()'s first argument"),
    Keyword("image", check_image, "an image to run on (a reference: alpine:3.20, "
            "docker.io/library/postgres:16) instead of a rootfs built from host binaries",
            option=True, instead="the image is run()'s first argument"),
    Keyword("entrypoint", check_entrypoint, "replace the image's Entrypoint (and its Cmd): "
            "a program, or a list of arguments", marker=False, library="entrypoint",
            flag=Flag(("--entrypoint",), metavar="PROGRAM")),
    Keyword("pull", check_pull, "when to pull an image: missing (from the "
            "store), always, never", default="missing", nullable=False, marker=False,
            library="pull", flag=Flag(("--pull",), choices=PULL_POLICIES)),
    Keyword("hostname", validate.check_hostname, "the container's hostname", default="minictr",
            nullable=False, library="hostname", flag=Flag(("--hostname",))),
    # Marker only: a container writes to its layer, and shares host paths with `mounts`.
    Keyword("writable", validate.check_writable, "host paths a sandboxed test body may write "
            "besides its tmp_path (the rest of the host is read-only to it)", default=(),
            nullable=False, instead="a container writes to its layer; mounts= binds host paths"),
    Keyword("cwd", validate.check_container_path, "working directory inside the container",
            default="/", nullable=False, marker=False, library="cwd", flag=Flag(("--cwd", "-w"))),
    Keyword("env", validate.check_env, "set NAME=VALUE in the container's (otherwise clean) "
            "environment", library="env",
            flag=Flag(("--env", "-e"), "append", "NAME[=VALUE]", collect=env_of),
            from_text=env_item),
    Keyword("user", validate.check_user, "False: container root is host root (root only); "
            "default: an unprivileged host uid", default=True, library="user",
            flag=Flag(("--no-userns",), "store_false", help="make container root host root "
                      "(root only; by default it is an unprivileged host uid)")),
    Keyword("seccomp", validate.check_bool, "False: no seccomp filter", default=True,
            nullable=False, library="seccomp",
            flag=Flag(("--no-seccomp",), "store_false",
                      help="do not install the default seccomp filter")),
    Keyword("allow_syscalls", confinement.check_syscalls, "let this call through the default "
            "seccomp filter", default=(), nullable=False, library="allow_syscalls",
            flag=Flag(("--allow-syscall",), "append", "NAME")),
    Keyword("capabilities", confinement.check_capabilities, "keep this capability too (e.g. "
            "NET_RAW, SYS_PTRACE)", default=(), nullable=False,
            library="capabilities", flag=Flag(("--cap-add",), "append", "CAP")),
    Keyword("rlimits", confinement.check_rlimits, "resource limit, like docker: nofile=8192, "
            "core=unlimited, stack=8388608:67108864 (bytes)", default=(),
            library="rlimits", flag=Flag(("--ulimit",), "append", "NAME=SOFT[:HARD]",
                                         collect=dict),
            from_text=pair("NAME=SOFT[:HARD], e.g. nofile=1024:4096 or core=unlimited",
                            soft_hard)),
    Keyword("output_limit", sizes.parse_size, "bytes kept of each output stream (default "
            "64M); the rest is dropped", default=DEFAULT_OUTPUT_LIMIT, marker=False,
            library="output_limit", flag=Flag(("--output-limit",), metavar="SIZE")),
    Keyword("kill_on_output_limit", validate.check_bool, "kill the container once a stream "
            "passes output_limit (a flood ends at once)", default=False, nullable=False,
            marker=False, library="kill_on_output_limit"),
    Keyword("layer_size", validate.check_layer_size, "most bytes the container may write to its "
            "filesystem (ENOSPC past it)", marker=False, library="layer_size",
            flag=Flag(("--layer-size",), metavar="SIZE")),
    Keyword("read_only", validate.check_bool, "the root filesystem read-only (/tmp stays a "
            "writable tmpfs, mounts keep their own mode)", default=False, nullable=False,
            library="read_only", flag=Flag(("--read-only",), "store_true")),
    Keyword("mounts", validate.check_mounts, "extra mounts: Mount.bind(...), Mount.tmpfs(...)",
            default=(), nullable=False, marker=False, library="mounts"),
    Keyword("ports", ports.check_ports, "publish this container port on the caller's "
            "loopback: 5432, 8080:80, 127.0.0.1::6379 (docker's -p syntax)", default=(),
            nullable=False, marker=False, library="ports",
            flag=Flag(("-p", "--publish"), "append", "[ADDRESS:][HOST_PORT:]PORT"),
            from_text=ports.check_docker_text),
    Keyword("pod", validate.check_pod, "share this pod's network namespace "
            "(runtime.pod())", marker=False, library="pod"),
    Keyword("layer", validate.check_layer_dir, "a host directory keeping the container's writes",
            marker=False, library="layer"),
    Keyword("run_as", confinement.check_run_as, "the command's uid[:gid] inside (numbers; gid "
            "0 if not given); must be mapped", marker=False, library="run_as",
            flag=Flag(("--user", "-u"), metavar="UID[:GID]")),
)
BY_NAME = {keyword.name: keyword for keyword in KEYWORDS}
DEFAULTS = {keyword.name: keyword.default for keyword in KEYWORDS}
MARKER_KEYWORDS = tuple(keyword.name for keyword in KEYWORDS if keyword.marker)
# The marker's one word that is no container's: how many sandboxed tests share a sandbox (read
# and checked by `plugin.settings.sandbox_scope`, beside --minictr-sandbox-scope)
MARKER_SCOPE = "scope"
OPTION_KEYWORDS = tuple(keyword for keyword in KEYWORDS if keyword.option)
FLAG_KEYWORDS = tuple(keyword for keyword in KEYWORDS if keyword.flag is not None)
# every name run() takes -> (keyword, the check of an older name with another unit)
_LIBRARY = {**{name: (k, None) for k in KEYWORDS if k.library for name in (k.library, k.name)},
            **{name: (k, check) for k in KEYWORDS for name, check in k.legacy}}
_SPELLINGS = {s: k for k in reversed(KEYWORDS) for s in k.spellings}  # `user=` over `--user`

if TYPE_CHECKING:
    from pytest_minictr.images.image import Image
    ContainerSettings = Any  # its fields are the table's: made at run time, unseen by mypy
else:
    ContainerSettings = make_dataclass(
        "ContainerSettings", [(name, Any, BY_NAME[name].default) for name in MARKER_KEYWORDS],
        frozen=True,
        namespace={"__doc__": "What one test's containers are: the options and the markers "
                              "merged, each value checked (see `KEYWORDS`).",
                   "__module__": __name__})


# ---------------------------------------------------------------------------------------------
# The front ends

def with_library_keywords(function: F) -> F:
    """`function` (which takes **keywords) with a signature that lists the library keywords
    and their defaults, so that help() and inspect show them as if written out."""
    signature = inspect.signature(function)
    written = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    listed = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=keyword.default)
              for name, (keyword, _) in _LIBRARY.items()]
    # inspect reads __signature__ first; mypy knows no such attribute on a callable
    function.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*written, *listed])
    return function


def check_library_keywords(given: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of ContainerRuntime.run(), checked, by the schema's names."""
    checked: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for name, value in given.items():
        if name not in _LIBRARY:
            raise _unknown("ContainerRuntime.run()", name, _LIBRARY, lambda k: k.library)
        keyword, legacy_check = _LIBRARY[name]
        if keyword.name in spelled:
            raise ConfigError(f"{spelled[keyword.name]}={given[spelled[keyword.name]]!r} and "
                              f"{name}={value!r} both set {keyword.name}: give one of them")
        spelled[keyword.name] = name
        checked[keyword.name] = keyword.validate(value, name) if legacy_check is None \
            else None if value is None else legacy_check(value, name)
    return checked


def check_marker_names(names: Iterable[str]) -> None:
    unknown = sorted(set(names) - set(MARKER_KEYWORDS))  # scope= is set apart before
    if unknown:
        raise _unknown("@pytest.mark.container", unknown[0], (*MARKER_KEYWORDS, MARKER_SCOPE),
                       lambda keyword: keyword.name if keyword.marker else None)


def _unknown(where: str, name: str, known: Iterable[str],
             named_here: Callable[[Keyword], str | None]) -> ConfigError:
    """The error for an unknown keyword, with the closest spelling of any keyword anywhere
    (`memory-limit`, `--publish`, `memroy`) as `where` spells that keyword."""
    known, keyword = list(known), _SPELLINGS.get(name)
    if keyword is not None and keyword.instead and named_here(keyword) is None:
        return ConfigError(f"{where}: unknown keyword {name!r}: {keyword.instead}")
    closest = difflib.get_close_matches(name.lstrip("-").replace("-", "_").lower(),
                                        {*_SPELLINGS, *known})
    suggestion = closest and (closest[0] if closest[0] in known
                              else named_here(_SPELLINGS[closest[0]]))
    hint = f"did you mean {suggestion!r}? " if suggestion else ""
    return ConfigError(f"{where}: unknown keyword {name!r} ({hint}known: {', '.join(known)})")


def check_marker_value(name: str, value: Any) -> Any:
    """One keyword of the `container` marker, checked; ConfigError names it."""
    check_marker_names((name,))
    return BY_NAME[name].validate(value, name)


def check_text(keyword: Keyword, text: str, spelled: str) -> Any:
    """An option's or a flag's text, checked."""
    return keyword.validate(keyword.from_text(text, spelled), spelled)


def marker_help() -> str:
    """The marker's line in `pytest --markers`."""
    signature = ", ".join([*(f"{name}={BY_NAME[name].default!r}" for name in MARKER_KEYWORDS),
                           f"{MARKER_SCOPE}='test'"])
    return (f"container({signature}): on a test that uses the `container` fixture, configure it; "
            "on any other test, run its body sandboxed (writable= names host paths it may write "
            "besides tmp_path). Limits ('64M', 0.5 CPUs, pids), wall-time timeout in seconds, "
            "network mode, which binaries its rootfs holds (or a prepared rootfs path), hostname,"
            " environment; and what a test that needs more than the strict default asks for: "
            "user=False (root inside is host root), seccomp=False, allow_syscalls=['ptrace'], "
            "capabilities=['NET_RAW'], rlimits={'nofile': 8192}. scope= (test, module or "
            "session): how many sandboxed tests share one sandbox, as --minictr-sandbox-scope")


# ---------------------------------------------------------------------------------------------
# The spec, from checked keywords

def make_spec(image: str | os.PathLike[str] | Image, command: Sequence[str] | None,
              **keywords: Any) -> ContainerSpec:
    """Check every keyword of `ContainerRuntime.run()`; one ConfigError names a bad one."""
    return spec_from(image, command, check_library_keywords(keywords))


def spec_from(image: Any, command: Any, checked: Mapping[str, Any]) -> ContainerSpec:
    """The spec of checked keyword values (by the schema's names; a missing one is its
    default), `image` and `command` checked here, as is what spans keywords (the layer and
    the rootfs, seccomp and this machine, ports and pods)."""
    values = {**DEFAULTS, **checked}
    source = _image_fields(image, command, values) if is_image(image) else {}
    if values["entrypoint"] is not None and not source:
        raise ConfigError("entrypoint= replaces an image's Entrypoint; a rootfs has none")
    rootfs = source.get("rootfs") or validate.check_host_dir(
        image, "image", "rootfs", " (build one with RootfsBuilder().build, or name an image)")
    if command is None and not source:
        command = _default_command(rootfs)
    confinement.check_seccomp_here(values["seccomp"])
    confinement.check_network_sharing(values)
    return ContainerSpec(
        rootfs=rootfs,
        layers=source.get("layers", ()),
        argv=validate.check_command(source.get("argv", command)),
        env=source.get("env") or tuple({**dict(DEFAULT_ENV), **(values["env"] or {})}.items()),
        cwd=source.get("cwd", values["cwd"]),
        stop_signal=source.get("stop_signal", 15),
        hostname=values["hostname"],
        network=values["network"],
        user_namespace=values["user"],
        timeout=values["timeout"],
        cpu_time_limit=values["cpu_time"],
        output_limit=values["output_limit"],
        kill_on_output_limit=values["kill_on_output_limit"],
        limits=Limits(memory=values["memory"], cpus=values["cpus"], pids=values["pids"]),
        mounts=values["mounts"],
        layer=None if values["layer"] is None
        else _check_layer_apart(values["layer"], source.get("layers", (rootfs,))),
        layer_size=_check_layer_size(values["layer_size"], values["layer"]),
        security=Security(seccomp=values["seccomp"], allow_syscalls=values["allow_syscalls"],
                          capabilities=values["capabilities"],
                          rlimits=confinement.with_cpu_backstop(values["rlimits"] or (),
                                                                values["cpu_time"])),
        read_only=values["read_only"],
        ports=values["ports"],
        pod=values["pod"],
        run_as=source.get("run_as", values["run_as"]),
    )


def make_exec_spec(spec: ContainerSpec, command: Any, env: Any = None,
                   timeout: Any = None) -> ContainerSpec:
    """Another command in the container of `spec`: the same confinement, cwd and environment
    (`env` added to it), its own argv and time limit."""
    added = {} if env is None else validate.check_env(env)
    return replace(spec, argv=validate.check_command(command),
                   env=tuple({**dict(spec.env), **added}.items()),
                   timeout=None if timeout is None
                   else validate.check_seconds(timeout, "timeout"))


def is_image(image: Any) -> bool:
    """Docker's rule: what names no directory (nor a path: '/x', './x', '~/x') is an image
    reference; an `Image` is one too."""
    if isinstance(image, str):
        return not image.startswith(("/", ".", "~")) and not os.path.isdir(image)
    return hasattr(image, "layers") and hasattr(image, "config")


def _image_fields(image: Any, command: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    # imported here: an image's modules (the store, the registry client) are for images only
    from pytest_minictr.images.apply import run_fields
    return run_fields(image, command, values)


def _default_command(rootfs: str) -> tuple[str, ...]:
    # imported here, as `_check_recipe` is: only a rootfs that is used needs the cache's reader
    from pytest_minictr.rootfs.cache import default_command
    return default_command(rootfs, "command=None")


def _check_layer_apart(layer: str, lowers: Sequence[str]) -> str:
    for lower in lowers:
        validate.check_layer_apart(layer, lower)
    return os.path.realpath(layer)


def _check_layer_size(layer_size: int | None, layer: Any) -> int | None:
    if layer_size is not None and layer is not None:
        raise ConfigError(f"layer_size={layer_size!r}: bounds the fresh tmpfs layer; a kept "
                          "layer= directory is as big as its filesystem")
    return layer_size
