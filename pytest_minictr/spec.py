"""What a container is asked to be: frozen values, and the one place they are put together.

`make_spec()` turns the loose keywords of `ContainerRuntime.run()` into a `ContainerSpec`, or
raises one `ConfigError` that names the keyword, the value and the fix; the keywords and their
checks are declared once, in `keywords`, for every front end (library, marker, options, CLI).
`spec_from()` puts checked values together, with the checks that span keywords (the layer and
the rootfs, seccomp and this machine). Everything downstream (launcher, mounts, cgroups)
trusts the spec.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pytest_minictr.errors import ConfigError
from pytest_minictr.ports import Port, as_dicts, from_dicts

# The checkers' public names, importable from here as before the schema had a module of its own
from pytest_minictr.validate import (  # noqa: F401
    DEFAULT_PATH,
    MAX_SECONDS,
    MAX_SIZE,
    MIN_MEMORY,
    NETWORK_MODES,
    check_command,
    check_container_path,
    check_encodable,
    check_env,
    check_host_dir,
    check_hostname,
    check_memory_limit,
    check_pids_limit,
    check_seccomp_here,
    check_seconds,
    check_sequence,
    is_within,
    parse_cpus,
    parse_size,
)

DEFAULT_OUTPUT_LIMIT = 64 * 1024 ** 2
# A clean environment: the host's never leaks in; TERM is 'dumb' because output is captured.
DEFAULT_ENV = (("PATH", DEFAULT_PATH), ("HOME", "/root"), ("TERM", "dumb"))
# Mount points the container gets from us (mounts.build_root): mounting over or inside them
# would hide or break our /proc and /dev; below /tmp is fine, /tmp itself would hide ours.
OWN_MOUNTS = ("/proc", "/dev")
OWN_MOUNT_POINTS = (*OWN_MOUNTS, "/tmp")


@dataclass(frozen=True)
class Limits:
    """Resource limits enforced through the container's cgroup; None means unlimited."""

    memory: int | None = None          # bytes, swap excluded
    cpus: float | None = None          # CPUs, like docker --cpus (1.5 = one and a half)
    pids: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.cpus, self.pids))


@dataclass(frozen=True)
class Mount:
    """An extra mount inside the container: a host path bound in, or a fresh tmpfs."""

    target: str
    source: str | None = None      # host path for a bind mount; None for a tmpfs
    read_only: bool = True
    size: int | None = None        # tmpfs size in bytes

    @classmethod
    def bind(cls, source: str | os.PathLike[str], target: str, read_only: bool = True) -> Mount:
        # not os.fspath(None): make_spec() names a source that is not a path
        return cls(target=target, read_only=read_only,
                   source=os.fspath(source) if isinstance(source, os.PathLike) else source)

    @classmethod
    def tmpfs(cls, target: str, size: int | str | None = None) -> Mount:
        return cls(target=target, read_only=False,
                   size=None if size is None else parse_size(size, "tmpfs size"))


@dataclass(frozen=True)
class Security:
    """How far the command is confined beyond its namespaces (see the `security` module).
    The defaults are the strict ones; each field loosens one thing, by name."""

    seccomp: bool = True                     # the default filter (see the `seccomp` module)
    allow_syscalls: tuple[str, ...] = ()     # calls that filter lets through after all
    capabilities: tuple[str, ...] = ()       # kept on top of security.DEFAULT_CAPABILITIES
    rlimits: tuple[tuple[str, int, int], ...] = ()  # (name, soft, hard) over the defaults


@dataclass(frozen=True)
class ContainerSpec:
    """A validated request for one container. Paths inside the container are absolute."""

    rootfs: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str = "/"
    hostname: str = "minictr"
    network: str = "loopback"
    user_namespace: bool = False
    timeout: float | None = None
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    limits: Limits = field(default_factory=Limits)
    mounts: tuple[Mount, ...] = ()
    layer: str | None = None       # host dir keeping the writable layer; None: a fresh tmpfs
    layer_size: int | None = None  # bytes the fresh tmpfs layer may hold; None: the kernel's
    security: Security = field(default_factory=Security)
    read_only: bool = False        # the root read-only (the layer unmounted); /tmp stays a tmpfs
    terminal: bool = False         # stdin, stdout, stderr are a pseudo-terminal (`minictr run -t`)
    ports: tuple[Port, ...] = ()   # published on the caller's side (see `ports`)
    pod: str | None = None         # the pod whose network namespace it shares

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies every field, a tenth of a millisecond
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["limits"] = vars(self.limits).copy()
        values["security"] = vars(self.security).copy()
        values["mounts"] = [vars(m).copy() for m in self.mounts]
        values["ports"] = as_dicts(self.ports)
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContainerSpec:
        """Rebuild a spec sent over the launcher socket (already validated by the caller)."""
        values = dict(data)
        values["argv"] = tuple(values["argv"])
        values["env"] = tuple(tuple(pair) for pair in values["env"])
        values["limits"] = Limits(**values["limits"])
        values["security"] = Security(
            seccomp=values["security"]["seccomp"],
            allow_syscalls=tuple(values["security"]["allow_syscalls"]),
            capabilities=tuple(values["security"]["capabilities"]),
            rlimits=tuple(tuple(limit) for limit in values["security"]["rlimits"]))
        values["mounts"] = tuple(Mount(**m) for m in values["mounts"])
        values["ports"] = from_dicts(values["ports"])
        return cls(**values)


def make_spec(image: str | os.PathLike[str], command: Sequence[str] | None,
              **keywords: Any) -> ContainerSpec:
    """Check every keyword of `ContainerRuntime.run()`; one ConfigError names a bad one."""
    # imported here: the schema imports this module for the values it builds
    from pytest_minictr.keywords import check_library_keywords
    return spec_from(image, command, check_library_keywords(keywords))


def spec_from(image: Any, command: Any, checked: Mapping[str, Any]) -> ContainerSpec:
    """The spec of checked keyword values (by the schema's names; a missing one is its
    default), `image` and `command` checked here, as is what spans keywords."""
    from pytest_minictr.keywords import DEFAULTS
    values = {**DEFAULTS, **checked}
    rootfs = check_host_dir(image, "image", "rootfs", " (build one with RootfsBuilder().build)")
    if command is None:
        command = _default_command(rootfs)
    check_seccomp_here(values["seccomp"])
    _check_network_sharing(values)
    return ContainerSpec(
        rootfs=rootfs,
        argv=check_command(command),
        env=tuple({**dict(DEFAULT_ENV), **(values["env"] or {})}.items()),
        cwd=values["cwd"],
        hostname=values["hostname"],
        network=values["network"],
        user_namespace=values["user"],
        timeout=values["timeout"],
        output_limit=values["output_limit"],
        limits=Limits(memory=values["memory"], cpus=values["cpus"], pids=values["pids"]),
        mounts=values["mounts"],
        layer=None if values["layer"] is None else _check_layer(values["layer"], rootfs),
        layer_size=_check_layer_size(values["layer_size"], values["layer"]),
        security=Security(seccomp=values["seccomp"], allow_syscalls=values["allow_syscalls"],
                          capabilities=values["capabilities"],
                          rlimits=values["rlimits"] or ()),
        read_only=values["read_only"],
        ports=values["ports"],
        pod=values["pod"],
    )


def _default_command(rootfs: str) -> tuple[str, ...]:
    from pytest_minictr.rootfs.cache import image_command
    command = image_command(rootfs)
    if not command:
        raise ConfigError(f"command=None: the rootfs {rootfs!r} has no default command (a "
                          "recipe declares one: recipe='redis', 'postgresql'); give the command")
    return command


def _check_network_sharing(values: Mapping[str, Any]) -> None:
    """Ports and pods need the loopback of a network namespace made as the spec says."""
    if values["network"] == "none" and (values["ports"] or values["pod"]):
        what = (f"ports={[port.container_port for port in values['ports']]!r}"
                if values["ports"] else "pod=")
        raise ConfigError(f"network='none' and {what}: a published port or a pod is reached "
                          "on the container's loopback; use network='loopback'")
    if values["pod"] is not None and values["ports"]:
        raise ConfigError("ports= and pod=: a pod's containers share its ports; publish "
                          "them on the pod: runtime.pod(ports=[...])")
    from pytest_minictr.container.security import NETWORK_CAPABILITIES
    kept = NETWORK_CAPABILITIES & set(values["capabilities"])
    if values["pod"] is not None and kept:
        raise ConfigError(f"capabilities={sorted(kept)!r} and pod=: a network capability "
                          "gives the container a network namespace of its own (see "
                          "`security`), so it cannot share the pod's")


def _check_layer_size(layer_size: int | None, layer: Any) -> int | None:
    if layer_size is not None and layer is not None:
        raise ConfigError(f"layer_size={layer_size!r}: bounds the fresh tmpfs layer; a kept "
                          "layer= directory is as big as its filesystem")
    return layer_size


def make_exec_spec(spec: ContainerSpec, command: Any, env: Any = None,
                   timeout: Any = None) -> ContainerSpec:
    """Another command in the container of `spec`: the same confinement, cwd and environment
    (`env` added to it), its own argv and time limit."""
    added = {} if env is None else check_env(env)
    return replace(spec, argv=check_command(command),
                   env=tuple({**dict(spec.env), **added}.items()),
                   timeout=None if timeout is None else check_seconds(timeout, "timeout"))


def check_layer_dir(value: Any, name: str = "layer") -> str:
    """An existing host directory, as given: its real path is compared with the rootfs's
    (and kept in the spec) once both are known."""
    check_host_dir(value, name)
    path: str = os.fspath(value)
    return path


def _check_layer(layer: str, rootfs: str) -> str:
    # overlayfs would write upper/ and work/ into the base every container shares (or refuse
    # the overlap with ELOOP, late, inside the container): compare real paths here instead.
    real = os.path.realpath(layer)
    if real == rootfs or is_within(real, rootfs) or is_within(rootfs, real):
        where = ("is the rootfs" if real == rootfs else "is inside the rootfs"
                 if is_within(real, rootfs) else "contains the rootfs")
        raise ConfigError(f"layer={layer!r}: {where} (image={rootfs!r}); the "
                          "writable layer must be a directory apart from it, e.g. "
                          "tempfile.mkdtemp()")
    return real


def check_mounts(mounts: Any, name: str = "mounts") -> tuple[Mount, ...]:
    return tuple(_check_mount(m) for m in check_sequence(mounts, name))


def _check_mount(mount: Any) -> Mount:
    if not isinstance(mount, Mount):
        raise ConfigError(f"mounts item {mount!r}: expected Mount.bind(...) or Mount.tmpfs(...)")
    target = _check_mount_target(mount.target)
    if not isinstance(mount.read_only, bool):  # 'no' would be truthy: a silent read-only
        raise ConfigError(f"mount read_only={mount.read_only!r} (on {target!r}): "
                          "expected True or False")
    if mount.source is None:
        _check_tmpfs(mount, target)
        return Mount(target=target, read_only=False, size=mount.size)
    source = mount.source
    if not isinstance(source, str) or "\0" in source or not os.path.isabs(source):
        raise ConfigError(f"mount source {source!r}: expected an absolute host path")
    check_encodable(source, "mount source")
    if not os.path.exists(source):
        raise ConfigError(f"mount source {source!r}: does not exist on the host")
    if mount.size is not None:
        raise ConfigError(f"mount size={mount.size!r} (on {target!r}): only a tmpfs has a size; "
                          f"a bind mount of {source!r} shows it as it is (drop size)")
    return Mount(target=target, source=os.path.realpath(source), read_only=mount.read_only)


def _check_mount_target(value: Any) -> str:
    target = check_container_path(value, "mount target")
    if ".." in value.split("/"):
        # Lexical normalization would be wrong wherever a component is a symlink in the
        # rootfs, and where it really points is only known inside the container.
        raise ConfigError(f"mount target {value!r}: '..' is not allowed; give the path "
                          f"without it, e.g. {target!r}")
    if target == "/":
        raise ConfigError("mount target '/': cannot mount over the container's root")
    for own in OWN_MOUNT_POINTS:
        if target == own or (own in OWN_MOUNTS and is_within(target, own)):
            what = "is" if target == own else "is inside"
            raise ConfigError(f"mount target {value!r}: {what} {own}, which the container "
                              f"gets from minictr; mount somewhere else"
                              + (" (below /tmp is fine, e.g. '/tmp/data')" if own == "/tmp"
                                 else ""))
    return target


def _check_tmpfs(mount: Mount, target: str) -> None:
    size = mount.size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                             or not 0 < size <= MAX_SIZE):
        raise ConfigError(f"mount size={size!r} (on {target!r}): expected a positive int of "
                          f"bytes, at most 2**62; Mount.tmpfs({target!r}, size='16M') parses "
                          "units")
    if mount.read_only:
        # mounts.py never remounts a tmpfs read-only: an empty read-only dir would be useless.
        raise ConfigError(f"mount read_only=True (on {target!r}): a tmpfs starts empty and is "
                          f"always writable; use Mount.tmpfs({target!r})")
