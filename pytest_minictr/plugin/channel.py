"""What a sandboxed body sends the worker (see `sandbox`): JSON lines on its report channel,
checked here before the worker believes any of them.

The body's process runs the code under test in pytest's own address space: that code can
write to any descriptor, patch pytest, read any object, exit at will. No check in the worker
can tell a report the plugin wrote from one the code under test wrote with the plugin's own
knowledge; what can be had is that nothing *short of that* passes: the plugin's report carries
a seal (random, made by the worker for this body alone, never on any descriptor or in the
environment), and the channel must hold exactly the lines the plugin writes, in their order.
A line that is not JSON, a report without the seal, a second report, anything after the
report but the init's status line: "the body wrote to its report channel", a failure. The
mode that holds against code that targets the plugin is trusted test code in the worker
running the untrusted code in a container of its own (README, "Verdicts").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

SETUP_KEYS = frozenset({"error", "unreachable"})  # written by the plugin before the test runs


def new_seal() -> str:
    return os.urandom(16).hex()


@dataclass(frozen=True)
class Received:
    """The channel's lines, if they are all the plugin's; else `foreign` says what is not."""

    lines: tuple[dict, ...]
    foreign: str | None = None
    report: dict | None = None  # the sealed report line, if any


def read_lines(data: bytes, seal: str, status_line: bool) -> Received:
    """`status_line`: without root our init writes the body's wait status last (see
    `container.body`); as root no one does, and such a line is foreign."""
    lines: list[dict] = []
    report = None
    for number, text in enumerate(data.splitlines(), 1):
        if not text:
            continue
        line = parse_line(text)
        why = _foreign(line, seal, report is not None, status_line, lines)
        if why is not None:
            return Received(tuple(lines), f"line {number}: {why}", report)
        assert line is not None
        if "report" in line:
            report = line
        lines.append(line)
    return Received(tuple(lines), None, report)


def parse_line(text: bytes) -> dict | None:
    """A line of the channel as the JSON object it should be, else None."""
    try:
        line = json.loads(text)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def _foreign(line: dict | None, seal: str, reported: bool, status_line: bool,
             before: list[dict]) -> str | None:
    if line is None:
        return "not a line of the plugin's"
    if any("status" in earlier for earlier in before):
        return "a line after the body's end"
    if "status" in line:
        return None if status_line and set(line) == {"status"} else "a status line"
    if "report" in line:
        if line.get("seal") != seal:
            return "a report without the plugin's seal"
        return "a second report" if reported else None
    if reported:
        return "a line after the report"
    return None if line.keys() and set(line) <= SETUP_KEYS else "a line of unknown kind"
