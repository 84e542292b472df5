"""A test's body run sandboxed: `@pytest.mark.container` on a test that does not use the
`container` fixture (or any test, with --minictr-sandbox-tests).

What runs where: fixtures are set up and torn down in the worker, as always; only the call
of the test function, with its fixture values, runs in a forked child of the worker (see
`container.body`), in namespaces of its own, the marker's cgroup (made and watched by the
launcher: `launcher.sandboxes`) and the containers' confinement, over a read-only view of the
host. The body lives in the worker's memory: this is the one place where forking pytest is
right, from its main thread, between the setup and the teardown phases.

The outcome comes back as pytest made it in the child: the child builds the call's report
with pytest's own hooks (so rewritten asserts, --tb styles, skip and xfail read as in
process) and sends it serialized as pytest-xdist does (`pytest_report_to_serializable`), with
its captured output, log text and warnings. In the worker, `pytest_pyfunc_call` returns as if
the test had passed, and `apply_outcome` gives the worker's report the child's verdict; so
the worker's own hooks (-x, --lf, JUnit XML, the terminal) see one ordinary report. An end
without a report (OOM kill, timeout, signal, os._exit) fails the test with one line.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import sys
import warnings
from dataclasses import dataclass, replace
from typing import NoReturn

import pytest

from pytest_minictr.caller.runtime import ContainerRuntime
from pytest_minictr.caller.sandbox import SandboxEnd
from pytest_minictr.container import seccomp
from pytest_minictr.container.body import run_sandboxed
from pytest_minictr.container.body_plan import BODY_JOINED, BodyPlan, BodyView, body_plan
from pytest_minictr.container.plan import Where
from pytest_minictr.errors import ConfigError, UnsupportedError
from pytest_minictr.host import linux
from pytest_minictr.host.proc import open_namespaces
from pytest_minictr.keywords import ContainerSettings
from pytest_minictr.plugin import secrets
from pytest_minictr.plugin.services import body_network_notes
from pytest_minictr.plugin.settings import SessionSettings, keep_env_names, merge_marker
from pytest_minictr.spec import Limits, Security

FIXTURE_ONLY = ("binaries", "recipe", "rootfs")
OUTCOME = pytest.StashKey["BodyOutcome"]()
MIB = 1024 ** 2
REFUSED = "Connection refused"  # in a failure: the body tried a server of the host's?
# setup failures that say the host (or our own sandbox) allows no namespaces here
_UNAVAILABLE_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL, errno.ENOSYS)


@dataclass(frozen=True)
class BodyOutcome:
    """What came back of a body: pytest's report of it, or a line saying how it ended."""

    report: dict | None           # the child's serialized call report
    failure: str | None           # one line, where there is no report
    notes: tuple[str, ...] = ()   # the figures, for the report's "minictr: sandbox" section
    network: tuple[str, ...] = ()  # for its "minictr: sandbox network" section


def wants_sandbox(item: pytest.Item, session: SessionSettings) -> bool:
    return (not in_body() and isinstance(item, pytest.Function)
            and "container" not in item.fixturenames
            and (session.sandbox_tests or item.get_closest_marker("container") is not None))


def body_settings(item: pytest.Item, session: SessionSettings) -> ContainerSettings:
    for marker in item.iter_markers("container"):
        for name in FIXTURE_ONLY:
            if marker.kwargs.get(name) is not None:
                raise ConfigError(
                    f"@pytest.mark.container: {name}= builds a rootfs for the `container` "
                    f"fixture, which this test does not use: its body runs sandboxed on a "
                    f"read-only view of the host (drop {name}=, or use the fixture)")
    return merge_marker(session.defaults, item)


def body_view(item: pytest.Function, settings: ContainerSettings,
              services: tuple[tuple[str, int], ...] = ()) -> BodyView:
    """The host read-only but its secrets (see `secrets`); writable: the test's tmp_path and
    `writable=`. Under /tmp (the body's own, over the host's) the worker's cwd and rootdir
    are shown read-only: the test's own files. Its network: its own, where the services'
    addresses lead to them (network='none': nothing)."""
    tmp = item.funcargs.get("tmp_path") or item.funcargs.get("tmpdir")
    writable = (*([os.path.realpath(str(tmp))] if tmp is not None else []), *settings.writable)
    cwd = os.getcwd()
    shown = (os.path.realpath(cwd), os.path.realpath(item.config.rootpath))
    hiding = secrets.hiding(_needed(item, shown))
    read_only = (*(p for p in shown if p.startswith("/tmp/")), *hiding.shown)
    return BodyView(
        cwd=cwd, read_only=tuple(dict.fromkeys(read_only)), hidden=hiding.hidden,
        writable=tuple(dict.fromkeys(writable)), hostname=settings.hostname,
        network=settings.network, user_namespace=settings.user,
        security=Security(seccomp=settings.seccomp, allow_syscalls=settings.allow_syscalls,
                          capabilities=settings.capabilities, rlimits=settings.rlimits or ()),
        services=services if settings.network != "none" else ())


def _needed(item: pytest.Function, shown: tuple[str, ...]) -> list[str]:
    """What a body must see even inside a hidden home: the project, the Python it runs,
    what it imports, tmp_path_factory's base."""
    factory = getattr(item.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)
    return [*shown, str(item.config.invocation_params.dir), sys.prefix, sys.base_prefix,
            *(path for path in sys.path if path and os.path.isdir(path)),
            *([str(base)] if base is not None else [])]


def run_body(item: pytest.Function, settings: ContainerSettings, runtime: ContainerRuntime,
             services: dict[tuple[str, int], str]) -> BodyOutcome:
    """In the worker: fork the body into its sandbox, wait for its end, read what it sent.
    `services`: the published addresses of the services running (and their fixtures)."""
    view = body_view(item, settings, tuple(services))
    if view.security.seccomp:
        seccomp.host_filter(view.security.allow_syscalls)  # built once, inherited
    lease = runtime.sandbox(Limits(settings.memory, settings.cpus, settings.pids),
                            settings.timeout, view.services)
    where = Where(cgroup_procs=lease.cgroup_procs, rootless=lease.init_pid is None)
    namespaces = _open_namespaces(lease.init_pid)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    worker = os.pidfd_open(os.getpid())  # the child dies with us (see container.body)
    pid = None
    try:
        try:
            plan = body_plan(view, where, tuple(namespaces[name] for name, _ in BODY_JOINED
                                                if name in namespaces), lease.relay)
            pid = _fork(namespaces.get("pid"))
            if pid == 0:
                live_as_body(plan, report_w, worker, item, _body_env(item, settings))
        finally:
            for fd in (report_w, worker, *namespaces.values()):
                os.close(fd)
            lease.watch(pid)
        lines = [json.loads(line) for line in _read_to_end(report_r).splitlines() if line]
        status = os.waitpid(pid, 0)[1]
        pid = None
    finally:
        os.close(report_r)
        if pid:  # interrupted (Ctrl-C, pytest-timeout): the body goes with us
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            lease.end(wait=False)
    # the figures are for a failed test's report: a passed one need not wait for them
    body = next((line for line in lines if "report" in line), None)
    told = lease.relay_told()
    end = lease.end(wait=body is None or body["report"]["outcome"] == "failed")
    network = body_network_notes(services, settings.network, [
        address for line in lines for address in line.get("unreachable", ())], told,
        refused=body is not None and REFUSED in json.dumps(body["report"].get("longrepr")))
    return replace(outcome_of(lines, status, end, settings, item.config), network=network)


def _body_env(item: pytest.Function, settings: ContainerSettings) -> dict[str, str | None]:
    """The changes to the worker's environment a body makes: credential-looking names
    unset (None), but those kept by name; the marker's env= set."""
    keep = keep_env_names(item.config)
    return {**dict.fromkeys(secrets.dropped_names(os.environ, keep)), **(settings.env or {})}


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
        return os.fork()
    linux.setns(pid_namespace, linux.CLONE_NEWPID)
    pid = None
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            linux.setns(_own_pid_namespace(), linux.CLONE_NEWPID)
    return pid


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


def live_as_body(plan: BodyPlan, report_w: int, worker: int, item: pytest.Function,
                 env: dict | None) -> NoReturn:
    """The forked child's life: the body's process from here on; it carries out `plan` and
    calls the test, and never returns into the worker (see `container.body`)."""
    _this_process.in_body = True
    run_sandboxed(plan, report_w, lambda: call_in_body(item, env), worker)


def call_in_body(item: pytest.Function, env: dict | None) -> bytes:
    """Call the test function as pytest would, and make its report here, where the traceback
    is; the report, the output captured here and the warnings, as one JSON line."""
    for name, value in (env or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    with warnings.catch_warnings(record=True) as caught:
        call = pytest.CallInfo.from_call(
            lambda: item.ihook.pytest_pyfunc_call(pyfuncitem=item), when="call")
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    config = item.config
    return json.dumps({
        "report": config.hook.pytest_report_to_serializable(config=config, report=report),
        **_captured(config),
        "warnings": [_warning_data(w) for w in caught]}, default=repr).encode() + b"\n"


def _captured(config: pytest.Config) -> dict:
    """What the worker's capture and log handler got from us: ours are copies, gone with us
    (with -s nothing is captured; the output went out live)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    capman = config.pluginmanager.getplugin("capturemanager")
    try:
        out, err = capman.read_global_capture()
    except (AttributeError, AssertionError):
        out, err = "", ""
    logging_plugin = config.pluginmanager.get_plugin("logging-plugin")
    log = logging_plugin.report_handler.stream.getvalue() if logging_plugin else ""
    return {"stdout": out, "stderr": err, "log": log}


def _warning_data(caught: warnings.WarningMessage) -> list:
    category = caught.category
    return [str(caught.message), f"{category.__module__}:{category.__qualname__}",
            caught.filename, caught.lineno]


# --- back in the worker -----------------------------------------------------------------------

def outcome_of(lines: list[dict], status: int, end: SandboxEnd,
               settings: ContainerSettings, config: pytest.Config) -> BodyOutcome:
    """The body's report if it made one; else the one line that says how it ended."""
    body = next((line for line in lines if "report" in line), None)
    setup = next((line["error"] for line in lines if "error" in line), None)
    notes = _figures(end, settings)
    if body is not None:
        replay(body, config)
        return BodyOutcome(body["report"], None, notes)
    if end.timed_out:
        return BodyOutcome(None, f"timeout={settings.timeout:g}s: the test body was killed "
                                 f"at its timeout", notes)
    if end.oom_killed:
        return BodyOutcome(None, f"memory={_size(settings.memory)} exceeded: killed by the OOM "
                                 f"killer, peak {_mib(end.memory_peak)}", notes)
    if setup is not None:
        return BodyOutcome(None, setup_failure(setup), notes)
    body_status = next((line["status"] for line in lines if "status" in line), status)
    return BodyOutcome(None, ending_of(body_status), notes)


def setup_failure(error: dict) -> str:
    text = f"@pytest.mark.container: the sandbox could not be set up: {error['message']}"
    if error.get("phase") in ("namespaces", "user namespace") \
            and error.get("errno") in _UNAVAILABLE_ERRNOS:
        raise UnsupportedError(text)
    return text


def ending_of(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return (f"the test body was killed by signal {signal.Signals(number).name} "
                f"({signal.strsignal(number)})")
    return (f"the test body exited with status {os.waitstatus_to_exitcode(status)} "
            "(os._exit?) before pytest could report it")


def _figures(end: SandboxEnd, settings: ContainerSettings) -> tuple[str, ...]:
    notes = []
    if end.lost:
        notes.append("the launcher sent no end: figures unknown")
    if end.memory_peak is not None:
        limit = "" if settings.memory is None else f" of memory={_size(settings.memory)}"
        notes.append(f"peak memory {_mib(end.memory_peak)}{limit}")
    if end.cpu_time is not None:
        notes.append(f"CPU time {end.cpu_time:.3f} s")
    if end.oom_killed:
        notes.append("the OOM killer killed a process of the body")
    if end.pids_refused:
        notes.append(f"pids={settings.pids} reached: {end.pids_refused} forks refused")
    return tuple(notes)


def replay(body: dict, config: pytest.Config) -> None:
    """Give the worker what the body's copies of its capture, log handler and warnings
    recorder got, for its own report."""
    _logging_plugin = config.pluginmanager.get_plugin("logging-plugin")
    sys.stdout.write(body["stdout"])
    sys.stderr.write(body["stderr"])
    if body["log"] and _logging_plugin is not None:
        _logging_plugin.report_handler.stream.write(body["log"])
    for message, category, filename, lineno in body["warnings"]:
        warnings.warn_explicit(message, _category(category), filename, lineno)


def _category(name: str) -> type[Warning]:
    module, _, qualname = name.partition(":")
    try:
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return UserWarning
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


def apply_outcome(item: pytest.Item, report: pytest.TestReport, outcome: BodyOutcome) -> None:
    """The worker's call report takes the body's verdict; it keeps its own sections (what
    the worker captured, which includes what the body printed) and duration. The item takes
    the properties the body recorded (JUnit XML reads them at teardown)."""
    config = item.config
    if outcome.report is not None:
        data = outcome.report
        if isinstance(data.get("longrepr"), list):  # a skip's (path, line, reason): JSON made
            data = {**data, "longrepr": tuple(data["longrepr"])}  # it a list
        body = config.hook.pytest_report_from_serializable(config=config, data=data)
        report.outcome = body.outcome
        report.longrepr = body.longrepr
        item.user_properties = [tuple(pair) for pair in body.user_properties]
        report.user_properties = list(item.user_properties)
        if hasattr(body, "wasxfail"):
            report.wasxfail = body.wasxfail
        elif hasattr(report, "wasxfail"):
            del report.wasxfail
    if outcome.notes and (report.failed or outcome.failure):
        report.sections.append(("minictr: sandbox", "\n".join(outcome.notes)))
    if outcome.network and (report.failed or outcome.failure):
        report.sections.append(("minictr: sandbox network", "\n".join(outcome.network)))


def _size(size: int | None) -> str:
    if size is None:
        return "unlimited"
    for unit, factor in (("G", 1024 ** 3), ("M", MIB), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / MIB:.1f} MiB"
