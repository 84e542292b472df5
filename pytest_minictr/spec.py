"""What a container is asked to be: validated once, at the edge, into frozen values.

`make_spec()` turns the loose keywords of `ContainerRuntime.run()` (and, through it, of the
marker and the CLI) into a `ContainerSpec`, or raises one `ConfigError` that names the keyword,
the value and the fix. Everything downstream (launcher, mounts, cgroups) trusts the spec.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

from pytest_minictr.container import security
from pytest_minictr.container.seccomp import ARCHITECTURES, FILTERED
from pytest_minictr.errors import ConfigError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_OUTPUT_LIMIT = 64 * 1024 ** 2
NETWORK_MODES = ("none", "loopback")
# Bounds past which the kernel (or select()/poll() in the launcher) would refuse or overflow.
MAX_SECONDS = 10 ** 6              # about 11 days: any wait, timeout or grace
MAX_SIZE = 2 ** 62                 # bytes; the cgroup and tmpfs parsers stop near 2**63
MIN_MEMORY = 4 * 1024 ** 2         # below this the container's own init cannot even start
# pids.max refuses more than PID_MAX_LIMIT (4194304, EINVAL), and the launcher adds one for
# the container's init (launcher._with_room_for_the_init).
MAX_PIDS = 4194304 - 1
# execve() refuses (E2BIG) one argument or NAME=value string of this many bytes, its NUL
# included: the kernel's MAX_ARG_STRLEN, 32 pages.
MAX_ARG_STRLEN = 32 * os.sysconf("SC_PAGE_SIZE")
# Mount points the container gets from us (mounts.build_root): mounting over or inside them
# would hide or break our /proc and /dev; below /tmp is fine, /tmp itself would hide ours.
OWN_MOUNTS = ("/proc", "/dev")
OWN_MOUNT_POINTS = (*OWN_MOUNTS, "/tmp")

_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "ib"):
        _SIZE_UNITS[_suffix] = 1024 ** _power
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# RFC 1123 labels; the kernel would take any 64 bytes, but other programs choke on the rest.
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


@dataclass(frozen=True)
class Limits:
    """Resource limits enforced through the container's cgroup; None means unlimited."""

    memory: int | None = None          # bytes, swap excluded
    cpu_percent: float | None = None   # percent of one CPU (150 = one and a half)
    pids: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.cpu_percent, self.pids))


@dataclass(frozen=True)
class Mount:
    """An extra mount inside the container: a host path bound in, or a fresh tmpfs."""

    target: str
    source: str | None = None      # host path for a bind mount; None for a tmpfs
    read_only: bool = True
    size: int | None = None        # tmpfs size in bytes

    @classmethod
    def bind(cls, source: str | os.PathLike, target: str, read_only: bool = True) -> "Mount":
        # not os.fspath(None): make_spec() names a source that is not a path
        return cls(target=target, read_only=read_only,
                   source=os.fspath(source) if isinstance(source, os.PathLike) else source)

    @classmethod
    def tmpfs(cls, target: str, size: int | str | None = None) -> "Mount":
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

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies every field, a tenth of a millisecond
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["limits"] = vars(self.limits).copy()
        values["security"] = vars(self.security).copy()
        values["mounts"] = [vars(m).copy() for m in self.mounts]
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ContainerSpec":
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
        return cls(**values)


def parse_size(value: int | str, name: str = "size") -> int:
    """'64M' -> 67108864. Units are powers of 1024, like docker's: B, K, M, G, T (KB, KiB ok)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{name}={value!r}: expected bytes as an int or a string like '64M'")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{name}={value!r}: not a size (use e.g. '512K', '64M', '1G')")
        number, unit = match.group(1), match.group(2).lower()
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{name}={value!r}: unknown unit {match.group(2)!r} (use K, M, G)")
    size = number if isinstance(number, int) else _scaled(number, _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{name}={value!r}: must be positive")
    if size > MAX_SIZE:
        raise ConfigError(f"{name}={value!r}: must be at most 2**62 bytes ({MAX_SIZE})")
    return size


def _scaled(number: str, unit: int) -> int:
    """'1.5' * 1024 in integers, rounded down: a float would round byte counts past 2**53
    and overflow to infinity on a long digit string."""
    whole, _, fraction = number.partition(".")
    if len(whole.lstrip("0")) > 24:  # far past MAX_SIZE; int() refuses 4300+ digits anyway
        return MAX_SIZE + 1
    fraction = fraction[:24]  # below a byte even in terabytes
    # lstrip: int() counts leading zeros against its 4300-digit limit too
    return int((whole + fraction).lstrip("0") or "0") * unit // 10 ** len(fraction)


def parse_cpus(value: float | int | str, name: str = "cpus") -> float:
    """Number of CPUs like `docker --cpus`: 0.5 is half of one CPU. Returns percent of one CPU."""
    try:
        cpus = float(value) if not isinstance(value, bool) else math.nan
    except OverflowError:  # an int past float range: far more CPUs than any host has
        cpus = math.inf
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected a number of CPUs such as 0.5 or 2") from None
    return _check_cpu_percent(cpus * 100, name, value)


def _check_cpu_percent(percent: float, name: str, shown: Any) -> float:
    available = os.cpu_count() or 1
    if not math.isfinite(percent) or percent < 1:
        raise ConfigError(f"{name}={shown!r}: must be at least 1% of one CPU")
    if percent > available * 100:
        raise ConfigError(f"{name}={shown!r}: this host has only {available} CPUs")
    return float(percent)


def make_spec(
    image: str | os.PathLike,
    command: Sequence[str],
    *,
    cpu_limit: float | None = None,
    memory_limit: int | str | None = None,
    pids_limit: int | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str = "/",
    hostname: str = "minictr",
    network: str = "loopback",
    user: bool | None = None,
    mounts: Sequence[Mount] = (),
    output_limit: int | str | None = DEFAULT_OUTPUT_LIMIT,
    layer: str | os.PathLike | None = None,
    seccomp: bool = True,
    allow_syscalls: Sequence[str] = (),
    capabilities: Sequence[str] = (),
    rlimits: Mapping[str, Any] | None = None,
    layer_size: int | str | None = None,
) -> ContainerSpec:
    """Validate every keyword of `ContainerRuntime.run()`; one ConfigError names a bad one."""
    rootfs = _check_rootfs(image)
    return ContainerSpec(
        rootfs=rootfs,
        argv=_check_command(command),
        env=_check_env(env),
        cwd=_check_container_path(cwd, "cwd"),
        hostname=check_hostname(hostname),
        network=_check_choice(network, "network", NETWORK_MODES),
        user_namespace=_check_user(user),
        timeout=_check_seconds(timeout, "timeout"),
        output_limit=DEFAULT_OUTPUT_LIMIT if output_limit is None
        else parse_size(output_limit, "output_limit"),
        limits=Limits(
            memory=None if memory_limit is None else check_memory_limit(memory_limit),
            cpu_percent=None if cpu_limit is None else _check_cpu_limit(cpu_limit),
            pids=None if pids_limit is None else check_pids_limit(pids_limit),
        ),
        mounts=tuple(_check_mount(m) for m in _check_sequence(mounts, "mounts")),
        layer=None if layer is None else _check_layer(layer, rootfs),
        layer_size=_check_layer_size(layer_size, layer),
        security=check_security(seccomp, allow_syscalls, capabilities, rlimits),
    )


def _check_layer_size(layer_size: Any, layer: Any) -> int | None:
    if layer_size is None:
        return None
    if layer is not None:
        raise ConfigError(f"layer_size={layer_size!r}: bounds the fresh tmpfs layer; a kept "
                          "layer= directory is as big as its filesystem")
    size = parse_size(layer_size, "layer_size")
    if size < MIN_MEMORY:
        raise ConfigError(f"layer_size={layer_size!r}: must be at least 4 MiB (the layer "
                          "also holds the container's mount points)")
    return size


def make_exec_spec(spec: ContainerSpec, command: Any, env: Any = None,
                   timeout: Any = None) -> ContainerSpec:
    """Another command in the container of `spec`: the same confinement, cwd and environment
    (`env` added to it), its own argv and time limit."""
    return replace(spec, argv=_check_command(command), env=_check_env(env, dict(spec.env)),
                   timeout=_check_seconds(timeout, "timeout"))


def _check_rootfs(image: Any) -> str:
    return _check_host_dir(image, "image", "rootfs", " (build one with RootfsBuilder().build)")


def _check_host_dir(value: Any, name: str, what: str = "directory", fix: str = "") -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(f"{name}={value!r}: expected the path of a {what} directory")
    path = os.fspath(value)
    if isinstance(path, bytes) or "\0" in path:
        raise ConfigError(f"{name}={value!r}: expected a str path without NUL bytes")
    _check_encodable(path, name)
    if not os.path.isdir(path):
        problem = "does not exist" if not os.path.lexists(path) else "is not a directory"
        raise ConfigError(f"{name}={path!r}: {what} {problem}{fix}")
    return os.path.realpath(path)


def _check_layer(value: Any, rootfs: str) -> str:
    # overlayfs would write upper/ and work/ into the base every container shares (or refuse
    # the overlap with ELOOP, late, inside the container): compare real paths here instead.
    layer = _check_host_dir(value, "layer")
    if layer == rootfs or _is_within(layer, rootfs) or _is_within(rootfs, layer):
        where = ("is the rootfs" if layer == rootfs else "is inside the rootfs"
                 if _is_within(layer, rootfs) else "contains the rootfs")
        raise ConfigError(f"layer={os.fspath(value)!r}: {where} (image={rootfs!r}); the "
                          "writable layer must be a directory apart from it, e.g. "
                          "tempfile.mkdtemp()")
    return layer


def _is_within(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _check_encodable(value: str, name: str) -> None:
    """The kernel takes bytes: a str that os.fsencode() cannot turn into them (a lone
    surrogate such as '\\ud800') would fail late, in the launcher or the container."""
    try:
        os.fsencode(value)
    except UnicodeEncodeError as error:
        bad = value[error.start:error.end]
        raise ConfigError(f"{name}={value!r}: {bad!r} at index {error.start} cannot be encoded "
                          f"for the kernel ({error.reason}); strings from os.fsdecode() or "
                          "os.listdir() are fine") from None


def _check_command(command: Any) -> tuple[str, ...]:
    if isinstance(command, (str, bytes)):
        raise ConfigError(f"command={command!r}: expected a list of arguments, "
                          f"e.g. ['/bin/sh', '-c', {command!r}]")
    items = tuple(_check_sequence(command, "command"))
    if not items:
        raise ConfigError("command=[]: the command is empty")
    for index, item in enumerate(items):
        if not isinstance(item, str) or "\0" in item:
            raise ConfigError(f"command item {item!r}: arguments must be str without NUL bytes")
        _check_encodable(item, f"command[{index}]")
        _check_exec_string(item, f"command[{index}]")
    if not items[0]:
        raise ConfigError("command[0]='': the program name is empty")
    return items


def _check_env(env: Any, base: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    # A clean environment: the host's never leaks in; TERM is 'dumb' because output is captured.
    merged = dict(base) if base is not None else {"PATH": DEFAULT_PATH, "HOME": "/root",
                                                  "TERM": "dumb"}
    if env is not None:
        if not isinstance(env, Mapping):
            raise ConfigError(f"env={env!r}: expected a mapping of names to values")
        for name, value in env.items():
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise ConfigError(f"env name {name!r}: must be a non-empty str without '=' or NUL")
            if not isinstance(value, str) or "\0" in value:
                raise ConfigError(f"env[{name!r}]={value!r}: values must be str without NUL")
            _check_encodable(name, "env name")
            _check_encodable(value, f"env[{name!r}]")
            _check_exec_string(value, f"env[{name!r}]", prefix=f"{name}=")
            merged[name] = value
    return tuple(merged.items())


def _check_exec_string(value: str, name: str, prefix: str = "") -> None:
    """A string execve() would refuse, with E2BIG, late, naming no argument."""
    size = len(os.fsencode(prefix + value)) + 1
    if size > MAX_ARG_STRLEN:
        raise ConfigError(f"{name}={value[:20]!r}...: {size} bytes, past the kernel's limit "
                          f"of {MAX_ARG_STRLEN} on one argument or NAME=value string "
                          "(MAX_ARG_STRLEN); pass big data as input= or in a file")


def _check_container_path(path: Any, name: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(f"{name}={path!r}: expected an absolute path inside the container")
    _check_encodable(path, name)
    # normpath keeps a leading '//' (POSIX leaves it implementation-defined); Linux does not
    # care, but '//proc' must not slip past the checks that compare paths with '/proc'.
    return "/" + os.path.normpath(path).lstrip("/")


def check_hostname(hostname: Any, name: str = "hostname") -> str:
    # fullmatch: '$' would let a trailing newline through. The pattern is ASCII-only, so it
    # also keeps out what os.fsencode() cannot encode.
    if not isinstance(hostname, str) or not _HOSTNAME_RE.fullmatch(hostname) \
            or len(hostname) > 64:
        raise ConfigError(f"{name}={hostname!r}: expected letters, digits, '-' and '.', "
                          "at most 64 characters")
    return hostname


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return value


def _check_user(user: Any) -> bool:
    """True (the default, None): container root is an unprivileged uid of the host. False:
    container root is host root, for a test that needs it (and a caller that is root)."""
    if user is None:
        return True
    if not isinstance(user, bool):
        raise ConfigError(f"user={user!r}: expected True, False or None (default: True)")
    if not user and os.geteuid() != 0:
        raise ConfigError("user=False: without root, a container needs a user namespace")
    return user


def check_security(seccomp: Any = True, allow_syscalls: Any = (), capabilities: Any = (),
                   rlimits: Any = None) -> Security:
    """The loosening keywords, each checked against what it can name."""
    if not isinstance(seccomp, bool):
        raise ConfigError(f"seccomp={seccomp!r}: expected True or False")
    allowed = _check_names(allow_syscalls, "allow_syscalls", FILTERED,
                           "not a call the default seccomp filter denies")
    if seccomp and os.uname().machine not in ARCHITECTURES:
        raise ConfigError(f"seccomp=True: no syscall table for {os.uname().machine} "
                          f"(known: {', '.join(ARCHITECTURES)}); pass seccomp=False")
    kept = _check_names(capabilities, "capabilities", security.CAPABILITY_NAMES,
                        "not a capability", normalize=_capability_name)
    return Security(seccomp=seccomp, allow_syscalls=allowed, capabilities=kept,
                    rlimits=_check_rlimits(rlimits))


def _capability_name(name: str) -> str:
    name = name.upper()
    return name[len("CAP_"):] if name.startswith("CAP_") else name


def _check_names(names: Any, keyword: str, known: Sequence[str], problem: str,
                 normalize=lambda name: name) -> tuple[str, ...]:
    for name in _check_sequence(names, keyword):
        if not isinstance(name, str) or normalize(name) not in known:
            raise ConfigError(f"{keyword}: {name!r} is {problem} (known: {', '.join(known)})")
    return tuple(normalize(name) for name in names)


def _check_rlimits(rlimits: Any) -> tuple[tuple[str, int, int], ...]:
    """{'nofile': 8192, 'core': 'unlimited', 'stack': (8M, 64M)}: one value sets both the
    soft and the hard limit; a pair sets them apart."""
    if rlimits is None:
        return ()
    if not isinstance(rlimits, Mapping):
        raise ConfigError(f"rlimits={rlimits!r}: expected a dict such as {{'nofile': 8192}}")
    checked = []
    for name, value in rlimits.items():
        if name not in security.RLIMIT_NAMES:
            raise ConfigError(f"rlimits: unknown limit {name!r} "
                              f"(known: {', '.join(sorted(security.RLIMIT_NAMES))})")
        pair = value if isinstance(value, tuple) and len(value) == 2 else (value, value)
        soft, hard = (_rlimit_value(name, value, v) for v in pair)
        if hard != security.UNLIMITED and (soft == security.UNLIMITED or soft > hard):
            raise ConfigError(f"rlimits: {name}={value!r}: the soft limit exceeds the hard one")
        checked.append((name, soft, hard))
    return tuple(checked)


def _rlimit_value(name: str, shown: Any, value: Any) -> int:
    if value is None or value == "unlimited":
        return security.UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ConfigError(f"rlimits: {name}={shown!r}: expected a number from 0 to 2**63, "
                          "'unlimited', or a (soft, hard) pair of them")
    return value


def check_seconds(value: Any, name: str, allow_zero: bool = False) -> float:
    """A duration given by the user, as float seconds: finite, positive (or 0 with
    `allow_zero`, e.g. a stop grace) and at most MAX_SECONDS, past which select()/poll()
    timeouts overflow. ConfigError names `name` otherwise."""
    expected = "a number of seconds, 0 or more" if allow_zero else "a positive number of seconds"
    # Comparisons, not math.isfinite(): that one raises OverflowError on a huge int.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r}: expected {expected}")
    if value > MAX_SECONDS:
        raise ConfigError(f"{name}={value!r}: must be at most {MAX_SECONDS} seconds "
                          f"(about {MAX_SECONDS // 86400} days)")
    return float(value)


def _check_seconds(value: Any, name: str) -> float | None:
    return None if value is None else check_seconds(value, name)


def _check_cpu_limit(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"cpu_limit={value!r}: expected a percent of one CPU, e.g. 50")
    # float() overflows on a huge int, either sign
    percent = math.inf if value > 1e300 else -math.inf if value < -1e300 else float(value)
    return _check_cpu_percent(percent, "cpu_limit", value)


def check_memory_limit(value: Any, name: str = "memory_limit") -> int:
    size = parse_size(value, name)
    if size < MIN_MEMORY:
        # The kernel takes 1M, then OOM-kills the container before its command runs, with no
        # output at all (or refuses with EBUSY, under the group's current usage).
        raise ConfigError(f"{name}={value!r}: must be at least 4 MiB ({MIN_MEMORY} "
                          "bytes), or the container is killed before it starts; use e.g. '64M'")
    return size


def check_pids_limit(value: Any, name: str = "pids_limit") -> int:
    pids = _check_positive_int(value, name)
    if pids > MAX_PIDS:
        raise ConfigError(f"{name}={value!r}: must be at most {MAX_PIDS} (the kernel's "
                          "PID_MAX_LIMIT, less one for the container's init); use None for "
                          "no limit")
    return pids


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")
    return value


def _check_sequence(value: Any, name: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name}={value!r}: expected a list")
    return value


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
    _check_encodable(source, "mount source")
    if not os.path.exists(source):
        raise ConfigError(f"mount source {source!r}: does not exist on the host")
    if mount.size is not None:
        raise ConfigError(f"mount size={mount.size!r} (on {target!r}): only a tmpfs has a size; "
                          f"a bind mount of {source!r} shows it as it is (drop size)")
    return Mount(target=target, source=os.path.realpath(source), read_only=mount.read_only)


def _check_mount_target(value: Any) -> str:
    target = _check_container_path(value, "mount target")
    if ".." in value.split("/"):
        # Lexical normalization would be wrong wherever a component is a symlink in the
        # rootfs, and where it really points is only known inside the container.
        raise ConfigError(f"mount target {value!r}: '..' is not allowed; give the path "
                          f"without it, e.g. {target!r}")
    if target == "/":
        raise ConfigError("mount target '/': cannot mount over the container's root")
    for own in OWN_MOUNT_POINTS:
        if target == own or (own in OWN_MOUNTS and _is_within(target, own)):
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
