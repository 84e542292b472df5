"""Sandboxes shared by many tests: `--minictr-sandbox-scope module|session` (ini
`minictr_sandbox_scope`, marker `scope=`).

At test scope (`sandbox`) fixtures run in the worker and only the call is forked. A shared
sandbox cannot work that way: it is forked once, so a fixture set up in the worker after the
fork would never reach it, and a suite's fixtures are its code as much as its tests are (an
untrusted suite's conftest must not run on the host). So here the body runs each item's whole
protocol (setup, call, teardown: pytest's own `pytest_runtest_protocol`, its fixtures, its
capture and warnings) in the sandbox, and the worker only drives it:

    worker ── {"run": nodeid, "next": nodeid | null} ──> body: the item's protocol, in it
    worker <── {"seal", "item", "reports", "warnings"} ── body (as each item ends)

The worker logs the reports it gets (its terminal, JUnit XML, -x, xdist's channel see
ordinary reports). "next" is the worker's next item if it runs in this sandbox too (same
scope, settings and, at module scope, module), else null: the body tears everything down
with the item and the sandbox ends. A sandbox that dies mid-way (a timeout, the OOM killer,
a crash, a line on its channel that is not the plugin's) fails the item it was running, with
the reason; the next item gets a new sandbox. Limits (memory, cpus, pids, timeout) are the
sandbox's, shared by its tests, the timeout counted from its fork.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pluggy
import pytest
from _pytest.runner import SetupState

from pytest_minictr.caller.runtime import ContainerRuntime
from pytest_minictr.container.body import write_all
from pytest_minictr.errors import MinictrError, UnsupportedError
from pytest_minictr.keywords import ContainerSettings
from pytest_minictr.plugin import sandbox
from pytest_minictr.plugin.channel import SETUP_KEYS, Received, new_seal, parse_line
from pytest_minictr.plugin.fixture import unavailable
from pytest_minictr.plugin.outcome import FORGED, outcome_of, replay_warnings, report_from
from pytest_minictr.plugin.settings import SessionSettings, sandbox_scope

SCOPE_HEADER = {
    "test": "test (a sandbox per test; fixtures in the worker)",
    "module": "module (a sandbox per module, its tests one after another; fixtures in it)",
    "session": "session (one sandbox for the worker's share; fixtures in it)"}
SERVICES = "minictr_service"
CLOSE_GRACE = 30.0  # seconds a sandbox may take to tear down its fixtures once told to end
_GROUP = pytest.StashKey["Group | None"]()
_WORKERS_FIXTURES: list[Any] = []  # in a body: see _forget_the_workers_fixtures


@dataclass(frozen=True)
class Group:
    """What makes items share a sandbox: the same of each of these."""

    scope: str                    # "module" | "session"
    settings: ContainerSettings
    module: str | None            # the item's file, at module scope


def group_of(item: pytest.Item, session: SessionSettings) -> Group | None:
    """None: the item runs as without a shared sandbox (not sandboxed, test scope, or a
    wrong marker: its setup in the worker reports that)."""
    if _GROUP not in item.stash:
        try:
            # services are started by the worker's launcher, which a body cannot reach
            scope = sandbox_scope(item, session) if sandbox.wants_sandbox(item, session) \
                and SERVICES not in getattr(item, "fixturenames", ()) else "test"
            group = None if scope == "test" else Group(
                scope, sandbox.body_settings(item, session),
                str(item.path) if scope == "module" else None)
        except MinictrError:
            group = None
        item.stash[_GROUP] = group
    return item.stash[_GROUP]


class SharedSandboxes:
    """The worker's side, registered as a plugin: runs the items of shared scope through
    the sandbox of their group, one at a time, the open one at most."""

    def __init__(self, session: SessionSettings, runtime: Callable[[], ContainerRuntime],
                 services: Callable[[], dict[tuple[str, int], str]]):
        self._session = session
        self._runtime = runtime
        self._services = services
        self._open: SharedSandbox | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None
                                ) -> bool | None:
        group = None if sandbox.in_body() else group_of(item, self._session)
        if group is None:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        stays = nextitem is not None and group_of(nextitem, self._session) == group
        for report in self._run(item, nextitem if stays else None, group):
            ihook.pytest_runtest_logreport(report=report)
        if not stays:
            self.close()
        _keep_the_worker_in_step(item, nextitem)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def pytest_sessionfinish(self) -> None:
        self.close()  # the run stopped early (-x, an interrupt): fixtures torn down there

    def close(self, kill: bool = False) -> None:
        sandboxed, self._open = self._open, None
        if sandboxed is not None:
            sandboxed.close(kill)

    def _run(self, item: pytest.Item, nextitem: pytest.Item | None,
             group: Group) -> list[Any]:
        if self._open is not None and self._open.group != group:
            self.close()
        try:
            if self._open is None:
                self._open = SharedSandbox(group, item, self._runtime(), self._services())
            return self._open.run(item, nextitem)
        except SandboxGone as error:
            self._open = None
            gone = error
        except pytest.fail.Exception as error:
            # pytest-timeout's alarm, in the worker (its timer started before the body's):
            # the test fails with its message, the sandbox goes (it was in the middle of it)
            self.close(kill=True)
            gone = SandboxGone(str(error), before_any=False)
        except UnsupportedError as error:
            gone = SandboxGone(str(error), before_any=True, unsupported=True)
        except MinictrError as error:  # the launcher's (a wrong limit for this host, ...)
            gone = SandboxGone(f"@pytest.mark.container: {error}", before_any=True)
        # reported outside the handler: no chained traceback
        return _failed(item, "setup" if gone.before_any else "call", gone.failure,
                       self._session if gone.unsupported else None)


class SandboxGone(Exception):
    """The sandbox ended before the item's reports came: `before_any`, it was never set up
    (the item's setup fails); else its call does."""

    def __init__(self, failure: str, before_any: bool, unsupported: bool = False):
        super().__init__(failure)
        self.failure, self.before_any, self.unsupported = failure, before_any, unsupported


class SharedSandbox:
    """One sandbox and the body in it that runs the items it is sent."""

    def __init__(self, group: Group, item: pytest.Item, runtime: ContainerRuntime,
                 services: dict[tuple[str, int], str]):
        self.group = group
        self._config = item.config
        # tmp_path is made in the body, under the worker's base for it: made now, writable
        base = str(item.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
        self._settings = replace(group.settings, writable=(*group.settings.writable, base))
        self._seal = seal = new_seal()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = sandbox.body_env(item, self._settings)
        channel = theirs.detach()
        forked = sandbox.fork_body(item, self._settings, runtime, services, channel,
                                   lambda: serve_items(item.session, channel, seal, env))
        self._pid: int | None = forked.pid
        self._lease = forked.lease
        self._rootless = forked.rootless
        self._channel = ours
        self._lines = ours.makefile("rb")
        self._setup: list[dict] = []      # the plugin's lines before the first item's
        self._status: int | None = None   # without root: the body's, from our init
        self._ran = 0
        try:
            forked.lease.watched()  # now: its body is reaped in several places below
        except BaseException:
            self._kill()
            raise

    def run(self, item: pytest.Item, nextitem: pytest.Item | None) -> list[Any]:
        """The item's reports, as the body made them; SandboxGone if it ended first."""
        command = {"run": item.nodeid, "next": None if nextitem is None else nextitem.nodeid}
        try:
            self._channel.sendall(json.dumps(command).encode() + b"\n")
        except OSError:
            pass  # gone: its end is read below
        message = self._next_message(item.nodeid)
        self._ran += 1
        replay_warnings(message["warnings"])
        return [report_from(self._config, data) for data in message["reports"]]

    def _next_message(self, nodeid: str) -> dict:
        while line := self._read_line():
            parsed = parse_line(line)
            why = self._foreign(parsed, nodeid)
            if why is not None:
                self._kill()
                raise SandboxGone(f"{FORGED}: {why}; the test's verdict is void",
                                  before_any=False)
            assert parsed is not None
            if parsed.get("item") == nodeid:
                return parsed
            if "status" in parsed:
                self._status = parsed["status"]
            else:
                self._setup.append(parsed)
        raise self._gone()

    def _read_line(self) -> bytes:
        try:
            return self._lines.readline()
        except OSError:  # reset: the body ended with our command unread
            return b""

    def _foreign(self, line: dict | None, nodeid: str) -> str | None:
        if line is None:
            return "not a line of the plugin's"
        if self._status is not None:
            return "a line after the body's end"
        if "status" in line:
            return None if self._rootless and set(line) == {"status"} else "a status line"
        if "item" in line:
            sealed = line.get("seal") == self._seal and line["item"] == nodeid
            return None if sealed else "a report without the plugin's seal"
        if self._ran == 0 and line.keys() and set(line) <= SETUP_KEYS:
            return None
        return "a line of unknown kind"

    def _gone(self) -> SandboxGone:
        """The body's end, mid-way: how it ended, as at test scope."""
        status = self._reap()
        end = self._lease.end(wait=True)
        received = Received(tuple(self._setup) + (
            () if self._status is None else ({"status": self._status},)))
        set_up = not any("error" in line for line in self._setup)
        try:
            failure = outcome_of(received, status, end, self._settings, self._config).failure
        except UnsupportedError as error:
            return SandboxGone(str(error), before_any=True, unsupported=True)
        return SandboxGone(f"the shared sandbox ({self.group.scope} scope) ended: "
                           f"{failure}", before_any=not set_up)

    def close(self, kill: bool = False) -> None:
        """Tell the body there is no more; it tears down what is still set up and ends (or
        is killed, after CLOSE_GRACE, or at once if `kill`)."""
        if self._pid is None:
            return
        if kill:
            self._kill()
            return
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_WR)
        if not select.select([self._channel], [], [], CLOSE_GRACE)[0]:
            self._kill()
            return
        while self._read_line():
            pass
        self._reap()
        self._lease.end(wait=False)

    def _kill(self) -> None:
        if self._pid is not None:
            os.kill(self._pid, signal.SIGKILL)
            self._reap()
            self._lease.end(wait=False)

    def _reap(self) -> int:
        status = 0
        if self._pid is not None:
            status = os.waitpid(self._pid, 0)[1]
            self._pid = None
            self._lines.close()
            self._channel.close()
        return status


def _failed(item: pytest.Item, when: str, failure: str,
            unsupported: SessionSettings | None) -> list[Any]:
    """The reports of an item its sandbox could not run: made by the worker's own hooks, as
    for a test that failed (or, where the host cannot, per --minictr-unavailable, skipped:
    `unsupported` holds the policy)."""
    def fail() -> None:
        if unsupported is not None:
            unavailable(unsupported, UnsupportedError(failure))
        pytest.fail(failure, pytrace=False)
    reports = [item.ihook.pytest_runtest_makereport(
        item=item, call=pytest.CallInfo.from_call(fail, when=when))]  # type: ignore[arg-type]
    if when == "call":  # its setup went well, in the sandbox
        reports.insert(0, item.ihook.pytest_runtest_makereport(
            item=item, call=pytest.CallInfo.from_call(lambda: None, when="setup")))
    reports.append(item.ihook.pytest_runtest_makereport(
        item=item, call=pytest.CallInfo.from_call(lambda: None, when="teardown")))
    return reports


def _keep_the_worker_in_step(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The worker's own fixtures (set up for items that ran in it, e.g. those using the
    `container` fixture) go when pytest would have ended them, as if this item ran here."""
    state = item.session._setupstate
    if state.stack:
        call = pytest.CallInfo.from_call(lambda: state.teardown_exact(nextitem),
                                         when="teardown")
        if call.excinfo is not None:
            item.ihook.pytest_runtest_logreport(
                report=item.ihook.pytest_runtest_makereport(item=item, call=call))


# --- in the body ----------------------------------------------------------------------------

def serve_items(session: pytest.Session, channel: int, seal: str,
                env: dict[str, str | None]) -> bytes:
    """The body's life in a shared sandbox: run each item the worker names, whole, and
    send its reports, sealed (see `channel`); at the end of the commands, tear down."""
    sandbox.change_env(env)
    _forget_the_workers_fixtures(session)
    config = session.config
    items = {item.nodeid: item for item in session.items}
    reports = sandbox.keep_logged_reports(config)
    caught = _keep(config, "pytest_warning_recorded")
    for name in ("pytest_runtest_logstart", "pytest_runtest_logfinish"):
        _keep(config, name)  # the worker logs the item's start and end
    for command in _commands(channel):
        item = items[command["run"]]
        nextitem = items[command["next"]] if command["next"] is not None else None
        item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        message = {"seal": seal, "item": item.nodeid,
                   "reports": [sandbox.serializable(config, report) for report, _ in reports],
                   "warnings": [sandbox.warning_data(kwargs["warning_message"])
                                for kwargs in caught]}
        write_all(channel, json.dumps(message, default=repr).encode() + b"\n")
        reports.clear()
        caught.clear()
    with contextlib.suppress(Exception):  # its reports went with its item: nowhere to go
        session._setupstate.teardown_exact(None)
    return b""


def _forget_the_workers_fixtures(session: pytest.Session) -> None:
    """Fixtures the worker set up before the fork (for tests that ran in it, such as those
    using the `container` fixture) are the worker's, to use and to end: the body makes its
    own values, in the sandbox, as for every other fixture here."""
    session._setupstate = SetupState()
    for item in session.items:
        info = getattr(item, "_fixtureinfo", None)
        for fixturedefs in getattr(info, "name2fixturedefs", {}).values():
            for fixturedef in fixturedefs:
                # kept, never collected: a generator fixture's copy finalized here would run
                # the worker's teardown in the body (closing the worker's launcher, ...)
                _WORKERS_FIXTURES.append((fixturedef.cached_result, [*fixturedef._finalizers]))
                fixturedef.cached_result = None
                fixturedef._finalizers.clear()


def _commands(channel: int) -> Any:
    buffer = b""
    while chunk := os.read(channel, 65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield json.loads(line)


def _keep(config: pytest.Config, name: str) -> list[Mapping[str, Any]]:
    """The hook `name` replaced, in this copy of pytest only: what it is called with is
    kept, no plugin here sees it (see `sandbox.keep_logged_reports`)."""
    kept: list[Mapping[str, Any]] = []

    def keep(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any],
             firstresult: bool) -> list[object]:
        kept.append(kwargs)
        return []
    relay: Any = config.hook
    spec = getattr(relay, name).spec
    setattr(relay, name, pluggy.HookCaller(name, keep, spec.namespace, spec.opts))
    return kept

