"""A test's body run sandboxed: `@pytest.mark.container` on a test that does not use the
`container` fixture (or any test, with --minictr-sandbox-tests).

What runs where: fixtures are set up and torn down in the worker, as always; only the call
phase of the item (its `runtest`, whatever its kind: a function with its fixture values, a
unittest method with its setUp and tearDown, a doctest, another plugin's item) runs in a
forked child of the worker (see
`container.body`), in namespaces of its own, the marker's cgroup (made and watched by the
launcher: `launcher.sandboxes`) and the containers' confinement, over a read-only view of the
host. The body lives in the worker's memory: this is the one place where forking pytest is
right, from its main thread, between the setup and the teardown phases.

The outcome comes back as pytest made it in the child: the child builds the call's report
with pytest's own hooks (so rewritten asserts, --tb styles, skip and xfail read as in
process) and sends it serialized as pytest-xdist does (`pytest_report_to_serializable`), with
its captured output, log text and warnings, and every report pytest logged in it (subtests'):
the body's own logging of them goes nowhere (its copies of the terminal, JUnit and xdist's
channel must not write), the worker logs them. In the worker, `runtest` returns as if the
test had passed, and `apply_outcome` gives the worker's report the child's verdict; so the
worker's own hooks (-x, --lf, JUnit XML, the terminal) see one ordinary report. An end
without a report (OOM kill, timeout, signal, os._exit) fails the test with one line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import pluggy
import pytest

from pytest_minictr.caller.runtime import ContainerRuntime
from pytest_minictr.caller.sandbox import SandboxLease
from pytest_minictr.container import seccomp
from pytest_minictr.container.body import run_sandboxed
from pytest_minictr.container.body_plan import BODY_JOINED, BodyPlan, BodyView, body_plan
from pytest_minictr.container.plan import Where
from pytest_minictr.errors import (
    ConfigError,
    ContainerSetupError,
    MinictrError,
    UnsupportedError,
)
from pytest_minictr.host import linux
from pytest_minictr.host.proc import open_namespaces
from pytest_minictr.keywords import ContainerSettings
from pytest_minictr.plugin import body_warnings, secrets
from pytest_minictr.plugin.body_warnings import capture_on
from pytest_minictr.plugin.channel import new_seal, read_lines
from pytest_minictr.plugin.outcome import LOGGED_CAPTURED, BodyOutcome, outcome_of
from pytest_minictr.plugin.services import body_network_notes
from pytest_minictr.plugin.settings import SessionSettings, keep_env_names, merge_marker
from pytest_minictr.spec import Limits, Security

FIXTURE_ONLY = ("binaries", "recipe", "rootfs", "image")
WHAT_RUNS = ("every item's call phase (functions, unittest, doctests, other plugins' items; "
             "a TestCase's setUp and tearDown with it)")
REFUSED = "Connection refused"  # in a failure: the body tried a server of the host's?


def wants_sandbox(item: pytest.Item, session: SessionSettings) -> bool:
    return (not in_body() and "container" not in getattr(item, "fixturenames", ())
            and (session.sandbox_tests or item.get_closest_marker("container") is not None))


def body_settings(item: pytest.Item, session: SessionSettings) -> ContainerSettings:
    for marker in item.iter_markers("container"):
        for name in FIXTURE_ONLY:
            if marker.kwargs.get(name) is not None:
                raise ConfigError(
                    f"@pytest.mark.container: {name}= builds a rootfs for the `container` "
                    f"fixture, which this test does not use: its body runs sandboxed on a "
                    f"read-only view of the host (drop {name}=, or use the fixture)")
    settings = merge_marker(session.defaults, item)
    if settings.cpu_time is not None:  # refused, not dropped: the launcher watches containers
        raise ConfigError(f"@pytest.mark.container: cpu_time={settings.cpu_time:g}: a CPU-time "
                          "limit is kept for a container's command, not for a sandboxed test "
                          "body (use timeout=, or run the code with the container fixture)")
    return replace(settings, writable=(*session.writable, *settings.writable))


def body_view(item: pytest.Item, settings: ContainerSettings,
              services: tuple[tuple[str, int], ...] = ()) -> BodyView:
    """The host read-only but its secrets (see `secrets`); writable: the test's tmp_path and
    `writable=`. Under /tmp (the body's own, over the host's) the worker's cwd and rootdir
    are shown read-only: the test's own files. Its network: its own, where the services'
    addresses lead to them (network='none': nothing)."""
    funcargs = getattr(item, "funcargs", {})
    tmp = funcargs.get("tmp_path") or funcargs.get("tmpdir")
    writable = (*([os.path.realpath(str(tmp))] if tmp is not None else []), *settings.writable)
    cwd = os.getcwd()
    shown = (os.path.realpath(cwd), os.path.realpath(item.config.rootpath))
    hiding = _hiding(tuple(_needed(item, shown)))
    read_only = (*(p for p in shown if p.startswith("/tmp/")), *hiding.shown)
    return BodyView(
        cwd=cwd, read_only=tuple(dict.fromkeys(read_only)), hidden=hiding.hidden,
        writable=tuple(dict.fromkeys(writable)), hostname=settings.hostname,
        network=settings.network, user_namespace=settings.user,
        security=Security(seccomp=settings.seccomp, allow_syscalls=settings.allow_syscalls,
                          capabilities=settings.capabilities, rlimits=settings.rlimits or ()),
        services=services if settings.network != "none" else ())


@functools.lru_cache(maxsize=8)
def _hiding(needed: tuple[str, ...]) -> secrets.Hiding:
    # the same paths test after test: resolving each (sys.path's too) cost ~0.3 ms a body
    return secrets.hiding(needed)


def _needed(item: pytest.Item, shown: tuple[str, ...]) -> list[str]:
    """What a body must see even inside a hidden home: the project, the Python it runs,
    what it imports, tmp_path_factory's base."""
    factory = getattr(item.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)
    return [*shown, str(item.config.invocation_params.dir), sys.prefix, sys.base_prefix,
            *(path for path in sys.path if path and os.path.isdir(path)),
            *([str(base)] if base is not None else [])]


def run_body(item: pytest.Item, runtest: Callable[[], None], settings: ContainerSettings,
             runtime: ContainerRuntime, services: dict[tuple[str, int], str]) -> BodyOutcome:
    """In the worker: fork the body into its sandbox, wait for its end, read what it sent.
    `runtest`: the item's own; `services`: the published addresses of the services running
    (and their fixtures)."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    seal = new_seal()
    env = body_env(item, settings)
    pid = None
    try:
        forked = fork_body(item, settings, runtime, services, report_w,
                           lambda: call_in_body(item, runtest, env, seal))
        pid, lease = forked.pid, forked.lease
        if not services:
            _ask_ahead(runtime, settings)
        received = read_lines(_read_to_end(report_r), seal, status_line=forked.rootless)
        lease.watched()
        status = os.waitpid(pid, 0)[1]
        pid = None
    finally:
        os.close(report_r)
        if pid:  # interrupted (Ctrl-C, pytest-timeout): the body goes with us
            os.kill(pid, signal.SIGKILL)
            lease.abandon()  # before the reap (see SandboxLease.watched)
            os.waitpid(pid, 0)
    # the figures are for a failed test's report: a passed one need not wait for them
    body = received.report
    told = lease.relay_told()
    end = lease.end(wait=body is None or body["report"]["outcome"] == "failed"
                    or received.foreign is not None)
    network = body_network_notes(services, settings.network, [
        address for line in received.lines for address in line.get("unreachable", ())], told,
        refused=body is not None and REFUSED in json.dumps(body["report"].get("longrepr")))
    return replace(outcome_of(received, status, end, settings, item.config), network=network)


@dataclass(frozen=True)
class Forked:
    """A body forked into its sandbox: the worker's child, its cgroup's lease."""

    pid: int
    lease: SandboxLease
    rootless: bool  # our init writes the body's status on its channel (see `channel`)


def fork_body(item: pytest.Item, settings: ContainerSettings, runtime: ContainerRuntime,
              services: Mapping[tuple[str, int], str], channel: int,
              body: Callable[[], bytes]) -> Forked:
    """In the worker: a new sandbox for `item`'s settings, and a body forked into it that
    runs `body` (its return value is the last it writes on `channel`, the body's end of its
    report channel, closed here)."""
    try:
        if threading.current_thread() is not threading.main_thread():
            # a fork from another thread copies a process whose main thread may hold any lock
            raise UnsupportedError("this item's call phase runs outside pytest's main "
                                   "thread, where the sandbox cannot fork it")
        view = body_view(item, settings, tuple(services))
        if view.security.seccomp:
            seccomp.host_filter(view.security.allow_syscalls)  # built once, inherited
        lease = runtime.sandbox(_limits(settings), settings.timeout, view.services)
    except BaseException:
        os.close(channel)
        raise
    where = Where(cgroup_procs=lease.cgroup_procs, rootless=lease.init_pid is None)
    namespaces = _open_namespaces(lease.init_pid)
    worker = os.pidfd_open(os.getpid())  # the child dies with us (see container.body)
    pid = None
    try:
        plan = body_plan(view, where, tuple(namespaces[name] for name, _ in BODY_JOINED
                                            if name in namespaces), lease.relay)
        pid = _fork(namespaces.get("pid"))
        if pid == 0:
            live_as_body(plan, channel, worker, body)
    finally:
        for fd in (channel, worker, *namespaces.values()):
            os.close(fd)
        lease.watch(pid)
    return Forked(pid, lease, where.rootless)


def _ask_ahead(runtime: ContainerRuntime, settings: ContainerSettings) -> None:
    """The next body's sandbox, as a rule the same as this one's, asked for now: the
    launcher makes it while this body runs, not on the next test's way (~1.5 ms a test).
    A failure here is the next body's to report, if it persists."""
    with contextlib.suppress(MinictrError, OSError):
        runtime.sandbox_ahead(_limits(settings), settings.timeout)


def _limits(settings: ContainerSettings) -> Limits:
    return Limits(settings.memory, settings.cpus, settings.pids)


def body_env(item: pytest.Item, settings: ContainerSettings) -> dict[str, str | None]:
    """The changes to the worker's environment a body makes: credential-looking names
    unset (None), but those kept by name; the marker's env= set."""
    keep = keep_env_names(item.config)
    return {**dict.fromkeys(_dropped_names(tuple(os.environ.items()), keep)),
            **(settings.env or {})}


@functools.lru_cache(maxsize=4)
def _dropped_names(environ: tuple[tuple[str, str], ...], keep: tuple[str, ...]
                   ) -> tuple[str, ...]:
    # per test, the same environment as a rule: its scan cost ~0.5 ms a test (measured)
    return secrets.dropped_names(dict(environ), keep)


def _open_namespaces(init_pid: int | None) -> dict[str, int]:
    """As root, fds of the spare's namespaces (the body joins them); {} without root."""
    if init_pid is None:
        return {}
    return open_namespaces(init_pid, ("pid", *(name for name, _ in BODY_JOINED)))


def _fork(pid_namespace: int | None) -> int:
    """As root, into the spare's PID namespace: setns(2) moves our next child there, not us;
    setns back to ours at once (in the parent only). Without root, an ordinary fork (see
    `container.body`)."""
    if pid_namespace is None:
        return _fork_the_worker()
    linux.setns(pid_namespace, linux.CLONE_NEWPID)
    pid = None
    try:
        pid = _fork_the_worker()
    finally:
        if pid != 0:
            linux.setns(_own_pid_namespace(), linux.CLONE_NEWPID)
    return pid


def _fork_the_worker() -> int:
    # Python 3.12+ warns at every fork of a process with threads (an xdist worker has
    # execnet's): the body lives in the worker's memory, so forking it is the design here, and
    # the warning would be reported as the test's own (a difference from in-process)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This process .* is multi-threaded, use of fork",
                                DeprecationWarning)
        return os.fork()


_pid_namespace_fd: list[int] = []


def _own_pid_namespace() -> int:
    if not _pid_namespace_fd:
        _pid_namespace_fd.append(os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
    return _pid_namespace_fd[0]


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# --- in the body's process ------------------------------------------------------------------

class _ThisProcess:
    """What this process is to the sandbox. Process-wide on purpose: from its fork on, a
    body's process (and whatever it forks) sandboxes nothing, not even a pytest run inline by
    the test."""

    in_body = False


_this_process = _ThisProcess()


def in_body() -> bool:
    """True in a sandboxed body's process: the plugin's hooks then let pytest call the test
    function there (it is the sandbox), and report what it did as in any process."""
    return _this_process.in_body


def live_as_body(plan: BodyPlan, report_w: int, worker: int,
                 body: Callable[[], bytes]) -> NoReturn:
    """The forked child's life: the body's process from here on; it carries out `plan` and
    runs `body`, and never returns into the worker (see `container.body`)."""
    _this_process.in_body = True
    run_sandboxed(plan, report_w, body, worker)


def change_env(env: dict[str, str | None] | None) -> None:
    """The worker's environment changed for a body (None: a name unset)."""
    for name, value in (env or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def call_in_body(item: pytest.Item, runtest: Callable[[], None],
                 env: dict[str, str | None] | None, seal: str) -> bytes:
    """Run the item as pytest would, and make its report here, where the traceback is; the
    report, the reports logged meanwhile, the output captured here and the warnings, as one
    JSON line, sealed (see `channel`)."""
    change_env(env)
    config = item.config
    logged = keep_logged_reports(config)
    with body_warnings.kept_and_passed_on() as caught:
        call = pytest.CallInfo.from_call(runtest, when="call")
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    # pytest's subtests fail a passed test with failed subtests in this hook, counting them
    # in a stash of the config's: the body's, which the worker never sees
    config.hook.pytest_report_teststatus(report=report, config=config)
    try:
        return json.dumps({
            "seal": seal, "report": serializable(config, report),
            "logged": [{**serializable(config, sub), LOGGED_CAPTURED: captured}
                       for sub, captured in logged],
            **_captured(config),
            "warnings": [warning_data(w) for w in caught]}, default=repr).encode() + b"\n"
    except Exception as error:  # noqa: BLE001 - not "the sandbox could not be set up"
        raise ContainerSetupError(f"{type(error).__name__}: {error}", "report") from None


def keep_logged_reports(config: pytest.Config) -> list[tuple[pytest.TestReport, bool]]:
    """From now on in this process, a report logged (`pytest_runtest_logreport`) is kept for
    the worker, with whether the capture was on, and goes to no plugin here: no hook lets one
    stop the others (it is no firstresult hook), so the hook itself is replaced, in this copy
    of pytest only."""
    kept: list[tuple[pytest.TestReport, bool]] = []

    def keep(name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object],
             firstresult: bool) -> list[object]:
        kept.append((kwargs["report"], capture_on(config)))  # type: ignore[arg-type]
        return []
    relay: Any = config.hook  # a HookRelay's hooks are attributes mypy does not know
    relay.pytest_runtest_logreport = pluggy.HookCaller("pytest_runtest_logreport", keep)
    return kept


def serializable(config: pytest.Config, report: pytest.TestReport) -> dict:
    return config.hook.pytest_report_to_serializable(config=config, report=report)


def _captured(config: pytest.Config) -> dict:
    """What the worker's capture and log handler got from us: ours are copies, gone with us
    (with -s nothing is captured; the output went out live)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # a test may leave them None (monkeypatch)
            stream.flush()
    capman = config.pluginmanager.getplugin("capturemanager")
    try:
        capman.deactivate_fixture()  # what capsys/capfd hold goes to the global capture
        out, err = capman.read_global_capture()
    except (AttributeError, AssertionError):
        out, err = "", ""
    logging_plugin = config.pluginmanager.get_plugin("logging-plugin")
    log = logging_plugin.report_handler.stream.getvalue() if logging_plugin else ""
    return {"stdout": out, "stderr": err, "log": log}


def warning_data(caught: warnings.WarningMessage) -> list:
    category = caught.category
    return [str(caught.message), f"{category.__module__}:{category.__qualname__}",
            caught.filename, caught.lineno]
