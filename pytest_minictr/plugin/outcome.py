"""What came back of a sandboxed body (see `sandbox`), in the worker: the body's report, or
the one line that says how it ended; the reports logged in the body, logged again here; the
worker's call report given the body's verdict."""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_minictr.caller.sandbox import SandboxEnd
from pytest_minictr.errors import UnsupportedError
from pytest_minictr.keywords import ContainerSettings
from pytest_minictr.plugin.channel import Received

OUTCOME = pytest.StashKey["BodyOutcome"]()
MIB = 1024 ** 2
# setup failures that say the host (or our own sandbox) allows no namespaces here
_UNAVAILABLE_ERRNOS = (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL, errno.ENOSYS)
FORGED = "@pytest.mark.container: the body wrote to its report channel"


@dataclass(frozen=True)
class BodyOutcome:
    """What came back of a body: pytest's report of it, or a line saying how it ended."""

    report: dict | None           # the child's serialized call report
    failure: str | None           # one line, where there is no report
    notes: tuple[str, ...] = ()   # the figures, for the report's "minictr: sandbox" section
    network: tuple[str, ...] = ()  # for its "minictr: sandbox network" section
    logged: tuple[dict, ...] = ()  # the reports pytest logged in the body (subtests'), serialized



def outcome_of(received: Received, status: int, end: SandboxEnd,
               settings: ContainerSettings, config: pytest.Config) -> BodyOutcome:
    """The body's report if it made one, sent nothing else and ended cleanly after it; else
    the one line that says how it ended. `status`: the wait status of the worker's child
    (without root, the keeper's: our init sends the body's)."""
    lines = received.lines
    body = received.report
    setup = next((line["error"] for line in lines if "error" in line), None)
    body_status = next((line["status"] for line in lines if "status" in line), status)
    notes = _figures(end, settings)
    if received.foreign is not None:
        return BodyOutcome(None, f"{FORGED}: {received.foreign}; the test's verdict is void",
                           notes)
    if body is not None and body_status != 0:
        return BodyOutcome(None, f"{FORGED}? an end mismatch: the body reported, then "
                                 f"{_after_report(body_status)}", notes)
    if body is not None:
        replay(body, config)
        return BodyOutcome(body["report"], None, notes, logged=tuple(body["logged"]))
    if end.timed_out:
        return BodyOutcome(None, f"timeout={settings.timeout:g}s: the test body was killed "
                                 f"at its timeout", notes)
    if end.oom_killed:
        return BodyOutcome(None, f"memory={_size(settings.memory)} exceeded: killed by the OOM "
                                 f"killer, peak {_mib(end.memory_peak)}", notes)
    if setup is not None:
        return BodyOutcome(None, setup_failure(setup), notes)
    return BodyOutcome(None, ending_of(body_status), notes)


def _after_report(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def setup_failure(error: dict) -> str:
    if error.get("phase") == "report":
        return f"@pytest.mark.container: the body could not send its report: {error['message']}"
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
    replay_warnings(body["warnings"])


def replay_warnings(caught: list[list]) -> None:
    """Warnings the body caught, warned again here: the worker's warnings plugin records
    them for the test that runs."""
    for message, category, filename, lineno in caught:
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


LOGGED_CAPTURED = "minictr_logged_captured"  # in a logged report's data: capture was on


def log_body_reports(item: pytest.Item, outcome: BodyOutcome) -> None:
    """Log what pytest logged in the body, as it would have in process (subtests log theirs
    with the capture suspended: the terminal shows them as they come)."""
    capman = item.config.pluginmanager.getplugin("capturemanager")
    for data in outcome.logged:
        # unittest's subTest logs with the capture on (its lines go to the test's captured
        # output), the `subtests` fixture with it off: as in the body, so in the worker
        captured = data.get(LOGGED_CAPTURED, False) or capman is None
        with contextlib.nullcontext() if captured else capman.global_and_fixture_disabled():
            item.ihook.pytest_runtest_logreport(report=report_from(item.config, data))


def report_from(config: pytest.Config, data: dict) -> Any:
    data = {name: value for name, value in data.items() if name != LOGGED_CAPTURED}
    if isinstance(data.get("longrepr"), list):  # a skip's (path, line, reason): JSON made
        data = {**data, "longrepr": tuple(data["longrepr"])}  # it a list
    report = config.hook.pytest_report_from_serializable(config=config, data=data)
    context = data.get("_subtest.context")
    if context is not None:  # a subtest's: rebuilding it repr()s its values again (n='1')
        object.__setattr__(report.context, "kwargs", dict(context["kwargs"]))
    return report


def apply_outcome(item: pytest.Item, report: pytest.TestReport, outcome: BodyOutcome) -> None:
    """The worker's call report takes the body's verdict; it keeps its own sections (what
    the worker captured, which includes what the body printed) and duration. The item takes
    the properties the body recorded (JUnit XML reads them at teardown)."""
    config = item.config
    if outcome.report is not None:
        body = report_from(config, outcome.report)
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
