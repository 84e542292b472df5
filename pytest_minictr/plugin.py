"""The pytest plugin: the `container` marker and fixture, and the `--minictr-*` options.

    @pytest.mark.container(memory="64M", cpus=0.5, pids=32, timeout=5, binaries=["sh", "seq"])
    def test_bounded(container):
        assert container.run("seq 3").stdout == b"1\\n2\\n3\\n"

Settings come from four places; a later one wins: the ini file (`minictr_*` keys), the
environment (`MINICTR_*`), the command line (`--minictr-*`), and the closest `container`
marker (function over class over module; their keywords merge). Everything is validated once,
when the test sets up its fixture: a wrong keyword or value fails that test with a message
naming it. Each worker of pytest-xdist has its own runtime (and launcher); the rootfs cache is
shared safely between them.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from pytest_minictr import __version__
from pytest_minictr.caller.runtime import Container, ContainerRuntime, ContainerStats, Result
from pytest_minictr.doctor import checks as doctor
from pytest_minictr.errors import ConfigError, MinictrError, UnsupportedError
from pytest_minictr.rootfs import recipe as recipes
from pytest_minictr.rootfs.builder import RootfsBuilder, default_cache_dir
from pytest_minictr.spec import (NETWORK_MODES, Security, check_hostname, check_memory_limit,
                                 check_pids_limit, check_seconds, check_security, parse_cpus)

# The keywords that loosen the confinement: checked together into one Security value.
SECURITY_KEYWORDS = ("seccomp", "allow_syscalls", "capabilities", "rlimits")
MARKER_KEYWORDS = ("memory", "cpus", "pids", "timeout", "network", "binaries", "recipe",
                   "rootfs", "hostname", "env", "user", *SECURITY_KEYWORDS)
MARKER_HELP = ("container(memory=None, cpus=None, pids=None, timeout=None, network='loopback', "
               "binaries=None, recipe=None, rootfs=None, hostname='minictr', env=None, "
               "user=True, seccomp=True, allow_syscalls=(), capabilities=(), rlimits=None): "
               "configure the `container` fixture of this test (class, module): limits "
               "('64M', 0.5 CPUs, pids), wall-time timeout in seconds, network mode, which "
               "binaries its rootfs holds (or a prepared rootfs path), hostname, environment; "
               "and what a test that needs more than the strict default asks for: user=False "
               "(root inside is host root), seccomp=False, allow_syscalls=['ptrace'], "
               "capabilities=['NET_RAW'], rlimits={'nofile': 8192}")
# Every container can run a shell string; these come along where the host has them.
BASE_BINARIES = ("sh", "env", "echo", "cat", "ls", "true", "false", "sleep", "mkdir", "rm",
                 "cp", "mv", "touch", "head", "tail", "wc", "grep", "sed", "seq", "sort", "tr",
                 "cut", "printf", "test", "id", "hostname", "uname", "pwd", "ln", "chmod",
                 "stat", "date", "basename", "dirname", "expr", "kill", "ps")
LAYER_PREFIX = "minictr-layer-"  # + the owner's pid: a layer of a dead owner is removed
STDERR_TAIL = 2000  # characters of the last container's stderr shown for a failed test

HELP_ROOTFS = "use this prepared rootfs directory as the base of every container"
HELP_CACHE = "where built root filesystems are cached (default: $XDG_CACHE_HOME/minictr)"
HELP_MEMORY = "default memory limit of every container, e.g. 256M"
HELP_CPUS = "default CPU limit of every container, in CPUs (0.5: half of one)"
HELP_PIDS = "default limit on processes and threads alive in a container"
HELP_TIMEOUT = "default wall-time limit of each container command, in seconds"
HELP_UNAVAILABLE = ("where this host cannot run containers: 'fail' the tests that need one "
                    "(default) or 'skip' them, with the reason either way")

# (name, help, parse) of the options that are read from ini < environment < command line
_OPTIONS = (
    ("rootfs", HELP_ROOTFS, str),
    ("cache_dir", HELP_CACHE, str),
    ("memory", HELP_MEMORY, str),
    ("cpus", HELP_CPUS, str),
    ("pids", HELP_PIDS, str),
    ("timeout", HELP_TIMEOUT, str),
    ("unavailable", HELP_UNAVAILABLE, str),
)


@dataclass(frozen=True)
class ContainerSettings:
    """What one test's containers are: the merged options and marker, validated."""

    memory: int | None = None
    cpu_percent: float | None = None
    pids: int | None = None
    timeout: float | None = None
    network: str = "loopback"
    binaries: tuple[str, ...] | None = None
    recipe: str | None = None
    rootfs: str | None = None
    hostname: str = "minictr"
    env: Mapping[str, str] = field(default_factory=dict)
    user: bool = True
    security: Security = field(default_factory=Security)


@dataclass(frozen=True)
class SessionSettings:
    """The options of the run, before any marker."""

    defaults: ContainerSettings
    cache_dir: Path
    unavailable: str          # "fail" | "skip"
    source: str               # where the rootfs comes from, for the report header


_SETTINGS = pytest.StashKey[SessionSettings]()
_LAST_RESULT = pytest.StashKey[Result]()
_ROOTFS_MEMO = pytest.StashKey[dict]()


# ---------------------------------------------------------------------------------------------
# Hooks

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minictr", "containers (pytest-minictr)")
    for name, help_text, _ in _OPTIONS:
        flag = "--minictr-" + name.replace("_", "-")
        if name == "unavailable":
            group.addoption(flag, dest=f"minictr_{name}", choices=("fail", "skip"),
                            help=help_text)
        else:
            group.addoption(flag, dest=f"minictr_{name}", metavar=name.upper(), help=help_text)
        parser.addini(f"minictr_{name}", help_text)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        config.stash[_SETTINGS] = read_session_settings(config)
    except ConfigError as error:
        raise pytest.UsageError(f"pytest-minictr: {error}") from None


def pytest_report_header(config: pytest.Config) -> str:
    settings = config.stash[_SETTINGS]
    return (f"minictr {__version__}: {doctor.header(doctor.examine(rehearse=False))}, "
            f"rootfs {settings.source}, cache {settings.cache_dir}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report shows its last container: command, how it ended, stderr."""
    outcome = yield
    report = outcome.get_result()
    result = item.stash.get(_LAST_RESULT, None)
    if report.failed and result is not None:
        report.sections.append(("minictr: last container", describe_result(result)))


# ---------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="session")
def minictr_runtime() -> ContainerRuntime:
    """The session's ContainerRuntime (one launcher per pytest process or xdist worker)."""
    remove_stale_layers()
    with ContainerRuntime() as runtime:
        yield runtime


@pytest.fixture(scope="session")
def minictr_rootfs_builder(pytestconfig: pytest.Config) -> RootfsBuilder:
    """A RootfsBuilder on the session's cache dir: build custom root filesystems once."""
    return RootfsBuilder(cache_dir=pytestconfig.stash[_SETTINGS].cache_dir)


@pytest.fixture
def container(request: pytest.FixtureRequest, minictr_runtime: ContainerRuntime,
              minictr_rootfs_builder: RootfsBuilder):
    """A container for this test, configured by the closest `container` marker. Its writable
    layer is the test's own: successive `run()`s see each other's writes, other tests never."""
    session = request.config.stash[_SETTINGS]
    try:
        settings = merge_marker(session.defaults, request.node)
        check_host_can_run_containers()
        rootfs = resolve_rootfs(settings, minictr_rootfs_builder,
                                request.config.stash.setdefault(_ROOTFS_MEMO, {}))
        problem = None
    except MinictrError as error:  # reported outside the handler: no chained traceback
        problem = error
    if isinstance(problem, UnsupportedError):
        _unavailable(session, problem)
    elif problem is not None:
        pytest.fail(str(problem), pytrace=False)
    box = TestContainer(minictr_runtime, rootfs, settings, request.node, session)
    yield box
    box.close()


class TestContainer:
    """The `container` fixture's value: run commands in fresh containers that share this
    test's writable layer on top of the (read-only, shared) `rootfs`; or start one in the
    background and exec commands beside it."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, runtime: ContainerRuntime, rootfs: Path, settings: ContainerSettings,
                 item: pytest.Item, session: SessionSettings):
        self.rootfs = rootfs
        self.settings = settings
        self._runtime = runtime
        self._item = item
        self._session = session
        self._layer: str | None = None
        self._started: Container | None = None

    def run(self, cmd: str | Sequence[str], input: bytes | None = None,
            timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        """Run `cmd` (a list, or a string for /bin/sh -c) and return its Result. `timeout`
        overrides the marker's; `env` adds to its environment."""
        if self._started is not None and self._started.status == "running":
            raise ConfigError("container.run() while container.start()'s command runs on this "
                              "test's layer: use container.exec() to run beside it, or "
                              "container.stop() it first")
        return self._remember(self._launch(cmd, input, timeout or self.settings.timeout,
                                           env).wait())

    def start(self, cmd: str | Sequence[str], env: Mapping[str, str] | None = None) -> Container:
        """Start `cmd` in the background (a server, a daemon under test) on this test's
        layer, with no time limit; `exec()` runs commands beside it. Stopped after the test."""
        if self._started is not None and self._started.status == "running":
            raise ConfigError("container.start(): this test's container already runs; "
                              "container.stop() it first")
        self._started = self._launch(cmd, None, None, env)
        return self._started

    def exec(self, cmd: str | Sequence[str], input: bytes | None = None,
             timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        """Run `cmd` inside the container start() started (its namespaces, files, loopback);
        its Result. `timeout` overrides the marker's."""
        if self._started is None:
            raise ConfigError("container.exec() runs beside a command started with "
                              "container.start(): start one first")
        return self._remember(self._started.exec(_argv(cmd), input=input,
                                                 timeout=timeout or self.settings.timeout,
                                                 env=env))

    def stop(self) -> Result:
        """Stop what start() started (SIGTERM, then SIGKILL after a grace); its Result."""
        if self._started is None:
            raise ConfigError("container.stop(): nothing was started with container.start()")
        return self._remember(self._started.stop())

    def stats(self) -> ContainerStats:
        """The started container's figures now (memory, CPU time, processes, limits)."""
        if self._started is None:
            raise ConfigError("container.stats(): nothing was started with container.start()")
        return self._started.stats()

    def _launch(self, cmd: str | Sequence[str], input: bytes | None, timeout: float | None,
                env: Mapping[str, str] | None) -> Container:
        s = self.settings
        try:
            container = self._runtime.run(
                self.rootfs, _argv(cmd), input=input, timeout=timeout,
                env={**s.env, **(env or {})}, memory_limit=s.memory, cpu_limit=s.cpu_percent,
                pids_limit=s.pids, network=s.network, hostname=s.hostname, user=s.user,
                seccomp=s.security.seccomp, allow_syscalls=s.security.allow_syscalls,
                capabilities=s.security.capabilities,
                rlimits={name: (soft, hard) for name, soft, hard in s.security.rlimits},
                layer=self._writable_layer())
        except UnsupportedError as problem:
            unsupported = problem
        else:
            return container
        _unavailable(self._session, unsupported)  # outside the handler: no chained traceback

    def _remember(self, result: Result) -> Result:
        self._item.stash[_LAST_RESULT] = result
        return result

    def _writable_layer(self) -> str:
        if self._layer is None:
            self._layer = tempfile.mkdtemp(prefix=f"{LAYER_PREFIX}{os.getpid()}-",
                                           dir=layer_parent())
        return self._layer

    def close(self) -> None:
        if self._started is not None:
            try:
                self._started.kill()
            except MinictrError:
                pass  # a dead launcher took it along; the test's report says so already
            self._started = None
        if self._layer is not None:
            remove_layer(self._layer)
            self._layer = None


# ---------------------------------------------------------------------------------------------
# Settings

def read_session_settings(config: pytest.Config) -> SessionSettings:
    values = {name: _option(config, name) for name, _, _ in _OPTIONS}
    defaults = ContainerSettings(
        memory=_memory(values["memory"], "--minictr-memory"),
        cpu_percent=None if values["cpus"] is None else parse_cpus(values["cpus"],
                                                                   "--minictr-cpus"),
        pids=_pids(values["pids"], "--minictr-pids"),
        timeout=_seconds(values["timeout"], "--minictr-timeout"),
        rootfs=_prepared_rootfs(values["rootfs"]),
    )
    unavailable = values["unavailable"] or "fail"
    if unavailable not in ("fail", "skip"):
        raise ConfigError(f"--minictr-unavailable={unavailable!r}: expected 'fail' or 'skip'")
    cache_dir = Path(values["cache_dir"]).expanduser() if values["cache_dir"] \
        else default_cache_dir()
    source = f"from {defaults.rootfs}" if defaults.rootfs else "built from host binaries"
    return SessionSettings(defaults, cache_dir, unavailable, source)


def _option(config: pytest.Config, name: str) -> str | None:
    """Command line, else environment, else ini: the first one set."""
    for value in (config.getoption(f"minictr_{name}"),
                  os.environ.get(f"MINICTR_{name.upper()}"),
                  config.getini(f"minictr_{name}")):
        if value not in (None, ""):
            return str(value)
    return None


def merge_marker(defaults: ContainerSettings, item: pytest.Item) -> ContainerSettings:
    """Apply the `container` markers from the farthest (module) to the closest (function)."""
    keywords: dict[str, Any] = {}
    for marker in reversed(list(item.iter_markers("container"))):
        if marker.args:
            raise ConfigError(f"@pytest.mark.container{marker.args!r}: takes keywords only, "
                              f"e.g. container(memory='64M')")
        unknown = sorted(set(marker.kwargs) - set(MARKER_KEYWORDS))
        if unknown:
            raise ConfigError(f"@pytest.mark.container: unknown keyword {unknown[0]!r} "
                              f"(known: {', '.join(MARKER_KEYWORDS)})")
        keywords.update(marker.kwargs)
    if keywords.get("rootfs") is not None and (keywords.get("binaries") is not None
                                               or keywords.get("recipe") is not None):
        raise ConfigError("@pytest.mark.container: give rootfs= or binaries=/recipe=, not both")
    security = {key: keywords.pop(key) for key in SECURITY_KEYWORDS if key in keywords}
    values = dict(_marker_value(key, value) for key, value in keywords.items())
    if security:
        values["security"] = check_security(**security)
    if values.get("binaries") is not None or values.get("recipe") is not None:
        values["rootfs"] = None  # the marker's binaries beat a --minictr-rootfs default
    return replace(defaults, **values)


def _marker_value(keyword: str, value: Any) -> tuple[str, Any]:
    """(settings field, validated value) of one marker keyword; ConfigError names it."""
    if keyword == "memory":
        return "memory", _memory(value, "memory")
    if keyword == "cpus":
        return "cpu_percent", None if value is None else parse_cpus(value, "cpus")
    if keyword == "pids":
        return "pids", _pids(value, "pids")
    if keyword == "timeout":
        return "timeout", _seconds(value, "timeout")
    if keyword == "network":
        if value not in NETWORK_MODES:
            raise ConfigError(f"network={value!r}: expected one of {', '.join(NETWORK_MODES)}")
        return "network", value
    if keyword == "binaries":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                not all(isinstance(b, str) and b for b in value):
            raise ConfigError(f"binaries={value!r}: expected a list of program names")
        return "binaries", tuple(value)
    if keyword == "recipe":
        recipes.find(value)  # ConfigError names an unknown one
        return "recipe", str(value)
    if keyword == "rootfs":
        return "rootfs", _prepared_rootfs(value, "rootfs")
    if keyword == "hostname":
        return "hostname", check_hostname(value)
    if keyword == "user":
        if not isinstance(value, bool):
            raise ConfigError(f"user={value!r}: expected True (default) or False")
        return "user", value
    if not isinstance(value, Mapping):  # env
        raise ConfigError(f"env={value!r}: expected a dict of names to values")
    return "env", dict(value)


def _prepared_rootfs(value: Any, name: str = "--minictr-rootfs") -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={value!r}: expected the path of a rootfs directory")
    try:
        path = Path(value).expanduser()
    except (RuntimeError, ValueError):  # '~nosuchuser', '~\0', '~\ud800'
        raise ConfigError(f"{name}={str(value)!r}: no such user, so no home directory to "
                          "expand '~' to") from None
    if not os.path.isdir(path):  # not path.is_dir(): it raises ENAMETOOLONG
        raise ConfigError(f"{name}={str(value)!r}: no such directory")
    if not any(path.iterdir()):
        raise ConfigError(f"{name}={str(value)!r}: the directory is empty (build one with "
                          "`minictr rootfs build --bin sh DEST`)")
    return str(path.resolve())


def _memory(value: Any, name: str) -> int | None:
    """From an option (a string, "64M") or a marker (a string or bytes as an int)."""
    if isinstance(value, str):
        value = value.strip()
    return None if value is None else check_memory_limit(value, name)


def _pids(value: Any, name: str) -> int | None:
    if isinstance(value, str):  # from an option
        try:  # not isdigit(): int() refuses '²', and 4300+ digits
            value = int(value)
        except ValueError:
            pass
    return None if value is None else check_pids_limit(value, name)


def _seconds(value: Any, name: str) -> float | None:
    if isinstance(value, str):  # from an option
        try:
            value = float(value)
        except ValueError:
            pass
    return None if value is None else check_seconds(value, name)


# ---------------------------------------------------------------------------------------------
# Rootfs, availability, reports

def resolve_rootfs(settings: ContainerSettings, builder: RootfsBuilder, memo: dict) -> Path:
    """A prepared rootfs if one was given, else one built (cached) from host binaries. Looked
    up once per session and set of binaries: checking the cache stats every file it copied,
    milliseconds a test would pay for nothing (a host upgrade mid-run is not our business)."""
    if settings.binaries is None and settings.recipe is None and settings.rootfs is not None:
        return Path(settings.rootfs)
    key = (settings.recipe, settings.binaries)
    if key not in memo:
        if settings.recipe is not None:
            memo[key] = builder.build(recipe=settings.recipe, binaries=settings.binaries or ())
        else:
            wanted = settings.binaries if settings.binaries is not None else BASE_BINARIES
            present = [name for name in dict.fromkeys(("sh", *wanted))
                       if name in (settings.binaries or ()) or shutil.which(name)]
            memo[key] = builder.build(binaries=present)
    return memo[key]


def check_host_can_run_containers() -> None:
    """UnsupportedError with doctor's words where the default container cannot run."""
    if not os.path.exists("/proc/self/ns/pid"):
        raise UnsupportedError("this system has no Linux namespaces (/proc/self/ns is missing)")
    problem = doctor.problem_text(host_findings())
    if problem is not None:
        raise UnsupportedError(f"{problem} (`minictr doctor` says more)")


@functools.lru_cache(maxsize=1)
def host_findings() -> list:
    """doctor's findings, rehearsal included: once per process, at the first container."""
    return doctor.examine()


def _unavailable(session: SessionSettings, problem: Exception):
    message = f"minictr cannot run containers here: {problem}"
    if session.unavailable == "skip":
        pytest.skip(message)
    pytest.fail(message + " (--minictr-unavailable=skip skips such tests)", pytrace=False)


def _argv(cmd: str | Sequence[str]) -> Sequence[str]:
    return ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else cmd


def remove_layer(layer: str) -> None:
    """Remove a writable layer. overlayfs leaves its work dir's inner `work` at mode 000: root
    removes it anyway, its owner only after giving itself the rights back."""
    for directory, subdirs, _ in os.walk(layer):
        for name in subdirs:
            path = os.path.join(directory, name)
            # never through a symlink: what the container left there may point anywhere
            # (nothing of it runs any more, so it cannot swap one in meanwhile)
            if not os.path.islink(path):
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass  # not ours: rmtree's ignore_errors covers what stays
    shutil.rmtree(layer, ignore_errors=True)


def layer_parent() -> str:
    """Where per-test layers go: /dev/shm, a tmpfs on most hosts (a layer in memory is faster
    to make and to drop, and what a container writes counts against its memory limit), else
    the temp dir."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) \
        else tempfile.gettempdir()


def remove_stale_layers() -> None:
    """Writable layers of test processes that died (SIGKILL) before their teardown."""
    for layer in Path(layer_parent()).glob(f"{LAYER_PREFIX}*"):
        owner = layer.name[len(LAYER_PREFIX):].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            remove_layer(layer)


def describe_result(result: Result) -> str:
    how = ("timed out" if result.timed_out else "OOM-killed" if result.oom_killed
           else f"returncode {result.returncode}")
    stderr = result.stderr.decode(errors="replace")
    tail = stderr[-STDERR_TAIL:] if stderr else "(empty)"
    return f"command: {list(result.args)!r}\n{how}, wall {result.wall_time:.3f} s\n" \
           f"stderr (last {STDERR_TAIL} characters):\n{tail}"
