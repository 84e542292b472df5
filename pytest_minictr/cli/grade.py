"""`minictr grade JOBS.jsonl [-o RESULTS.jsonl] [--workers N | --ray ADDRESS] [--resume]
[--progress]`: a batch
of grading jobs (one JSON object a line, DESIGN §3d; `-` or nothing: stdin) through a
`Grader`, one result a line as each job ends.

The exit status is 0 when every job got a verdict (whatever it was), 1 when a job ended
`infra_error` or a line was not a job (each named on stderr by its line number; the rest
still runs), 130 after Ctrl-C. Ctrl-C (or SIGTERM) never cuts a result line in two: the
signal waits for the line being written, then the workers are stopped (each kills its
containers and removes its workspace) and the command ends. `--resume` appends to the output
file, skipping the ids already there (a line cut by a crash is dropped first), so an
interrupted batch goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from pytest_minictr.errors import ConfigError, MinictrError

if TYPE_CHECKING:
    from pytest_minictr.grading.jobs import Job

EXIT_INTERRUPTED = 130
INFRA_ERROR = "infra_error"  # (results.INFRA_ERROR: the grading package loads on use only)


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    grade = commands.add_parser("grade", help="grade a batch of jobs (JSON lines) in containers")
    grade.add_argument("jobs", nargs="?", default="-",
                       help="the jobs, one JSON object a line (default, or -: stdin)")
    grade.add_argument("-o", "--output", metavar="RESULTS",
                       help="write the results here (default: stdout), one JSON line each")
    grade.add_argument("--workers", type=int, default=None, metavar="N",
                       help="jobs graded at once, each worker with its own runtime "
                            "(default: one per core)")
    grade.add_argument("--ray", metavar="ADDRESS",
                       help="grade on this Ray cluster's nodes (auto, HOST:PORT, "
                            "ray://HOST:10001) instead of local workers; needs "
                            "pip install 'pytest-minictr[ray]'")
    grade.add_argument("--resume", action="store_true",
                       help="skip the ids already in the output file, and append to it")
    grade.add_argument("--workdir", metavar="DIR",
                       help="where the jobs' files go while they run (default: /dev/shm, "
                            "where what a case writes counts against its memory limit)")
    grade.add_argument("--progress", action="store_true",
                       help="show the progress line on stderr even when it is not a terminal")
    grade.set_defaults(handler=grade_command)


def grade_command(args: argparse.Namespace) -> int:
    from pytest_minictr.grading.batch import Grader  # multiprocessing: not for `minictr run`
    if args.resume and not args.output:
        raise ConfigError("minictr grade --resume: give the output file with -o RESULTS")
    done = ids_written(args.output) if args.resume else set()
    source = sys.stdin if args.jobs == "-" else _open_jobs(args.jobs)
    bad_lines: list[int] = []
    total = None if args.jobs == "-" else _count_lines(args.jobs)
    progress = Progress(sys.stderr, total, len(done)) \
        if args.progress or sys.stderr.isatty() else None
    interrupts = DeferredInterrupts()
    out = sys.stdout if not args.output else open(args.output, "a" if args.resume else "w")
    verdicts: Counter[str] = Counter()
    try:
        with interrupts.installed(), \
                Grader(args.workers, workdir=args.workdir, ray=args.ray) as grader:
            for result in grader.imap_unordered(read_jobs(source, done, bad_lines)):
                with interrupts.deferred():
                    out.write(json.dumps(result.to_json()) + "\n")
                    out.flush()
                verdicts[result.verdict] += 1
                if progress:
                    progress.show(verdicts)
    except KeyboardInterrupt:
        if progress:
            progress.end()
        print("minictr grade: interrupted; run again with --resume to go on", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if out is not sys.stdout:
            out.close()
        if source is not sys.stdin:
            source.close()
    if progress:
        progress.end()
    return 1 if bad_lines or verdicts[INFRA_ERROR] else 0


def read_jobs(source: IO[str], done: set[str], bad_lines: list[int]) -> Iterator[Job]:
    """The jobs of `source`, but those whose id is in `done`; a line that is not a job is
    named on stderr, added to `bad_lines`, and skipped."""
    from pytest_minictr.grading.jobs import Job
    seen: dict[str, int] = {}
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            job = Job.from_json(json.loads(line))
            if job.id in seen:  # --resume goes by id: two jobs of one id would be one
                raise ConfigError(f"job {job.id!r}: id: already the id of line {seen[job.id]}")
        except (ValueError, MinictrError) as error:  # (JSONDecodeError is a ValueError)
            bad_lines.append(number)
            print(f"minictr grade: line {number}: {error}", file=sys.stderr)
            continue
        seen[job.id] = number
        if job.id not in done:
            yield job


def ids_written(path: str) -> set[str]:
    """The ids of the results in `path`, after dropping a last line a crash cut short."""
    try:
        with open(path, "rb+") as results:
            data = results.read()
            whole = data[:data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                results.truncate(len(whole))
    except FileNotFoundError:
        return set()
    ids = set()
    for line in whole.splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def _open_jobs(path: str) -> IO[str]:
    try:
        return open(path)
    except OSError as error:
        raise ConfigError(f"minictr grade: cannot read {path!r} ({error.strerror})") from None


def _count_lines(path: str) -> int:
    with open(path, "rb") as jobs:
        return sum(1 for line in jobs if line.strip())


class DeferredInterrupts:
    """SIGINT and SIGTERM as KeyboardInterrupt, held back while a result line is written."""

    def __init__(self) -> None:
        self.writing = False
        self.pending = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {signum: signal.signal(signum, self._handle)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending:
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: Any) -> None:
        if self.writing:
            self.pending = True
        else:
            raise KeyboardInterrupt


class Progress:
    """One line on a terminal, rewritten as jobs end: done/total and counts by verdict."""

    def __init__(self, stream: IO[str], total: int | None, skipped: int):
        self.stream = stream
        self.total = total
        self.skipped = skipped

    def show(self, verdicts: Counter[str]) -> None:
        done = sum(verdicts.values())
        of = "" if self.total is None else f"/{self.total - self.skipped}"
        counts = " ".join(f"{verdict} {count}" for verdict, count in sorted(verdicts.items()))
        self.stream.write(f"\r\x1b[K{done}{of} jobs  {counts}")
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
