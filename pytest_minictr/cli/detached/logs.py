"""`minictr logs [-f] [--tail N] [--timestamps] ID`: what a detached container wrote, kept by
its shim in stdout.log and stderr.log, with when each line began in stdout.times and
stderr.times (one `OFFSET EPOCH-SECONDS` line per line of output; see `shim.copy_with_times`)."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from pytest_minictr.cli.detached.records import Store
from pytest_minictr.errors import ConfigError

FOLLOW_POLL = 0.1  # seconds between looks at the logs for more


def add_command(commands: argparse._SubParsersAction[Any]) -> None:
    logs = commands.add_parser("logs", help="what a detached container wrote")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing what it writes, until it ends")
    logs.add_argument("--tail", "-n", metavar="N", default="all",
                      help="only the last N lines of each stream (default all)")
    logs.add_argument("--timestamps", action="store_true",
                      help="start each line with when it was written (RFC 3339, UTC)")
    logs.set_defaults(handler=show_logs)


def show_logs(args: argparse.Namespace) -> int:
    tail = _lines_wanted(args.tail)
    store = Store()
    container_id = store.resolve(args.id)
    kept = store.read(container_id).logs
    if not kept:
        raise ConfigError(f"container {args.id} ran in the foreground: its output went to "
                          "the terminal of its `minictr run`, and no logs were kept (`run -d` "
                          "keeps them)")
    streams = [_Stream(Path(path), out, args.timestamps)
               for path, out in zip(kept, (sys.stdout.buffer, sys.stderr.buffer), strict=True)]
    alive = args.follow and store.read(container_id).alive
    for stream in streams:
        stream.print_new(tail, hold_partial=alive)
    while alive:
        time.sleep(FOLLOW_POLL)
        alive = store.read(container_id).alive  # before reading: nothing written is missed
        for stream in streams:
            stream.print_new(None, hold_partial=alive)
    return 0


def _lines_wanted(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit():
        raise ConfigError(f"--tail {text!r}: expected a number of lines, or all")
    return int(text)


class _Stream:
    """One log file, printed from where the last look left off (whole lines only)."""

    def __init__(self, path: Path, out: BinaryIO, timestamps: bool):
        self.path, self.out, self.timestamps = path, out, timestamps
        self.offset = 0

    def print_new(self, tail: int | None, hold_partial: bool) -> None:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return  # the shim had not made it yet
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n") and hold_partial:
            lines.pop()  # a line being written: the next look prints it whole
        starts = []
        for line in lines:
            starts.append(self.offset)
            self.offset += len(line)
        if tail is not None:
            lines, starts = lines[len(lines) - tail:] if tail else [], starts[len(starts) - tail:]
        times = self._times() if self.timestamps else {}
        for start, line in zip(starts, lines, strict=True):
            if self.timestamps:
                self.out.write(_rfc3339(times.get(start)).encode() + b" ")
            self.out.write(line)
        self.out.flush()

    def _times(self) -> dict[int, float]:
        times = {}
        try:
            for line in self.path.with_suffix(".times").read_text().splitlines():
                offset, _, when = line.partition(" ")
                times[int(offset)] = float(when)
        except (OSError, ValueError):
            pass  # no times kept: lines are shown without them
        return times


def _rfc3339(when: float | None) -> str:
    if when is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
