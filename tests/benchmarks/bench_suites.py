"""Real test suites plain and sandboxed (#27): do outcomes match, test by test, and at what cost?

What it runs: each project's own test suite, from its PyPI sdist (versions pinned below), in a
throwaway venv of its own under the cache dir (the project installed from the sdist, its test
requirements, this pytest and pytest-xdist, and this checkout's plugin by a .pth file), at
-n 1 and -n 2 each way, from a fresh copy of the sdist each time:

  plain -n1, plain -n2           the suite as its authors run it (under xdist)
  sandboxed -n1, sandboxed -n2   the same with --minictr-sandbox-tests (and, for suites
                                 with Hypothesis, --minictr-writable .hypothesis)
  sandboxed:SCOPE -n1, -n2       with --scopes module,session besides test: the same at
                                 --minictr-sandbox-scope SCOPE

each with --junitxml. Every run's outcomes (nodeid -> passed, failed, skipped, xfailed, error;
a test reported more than once, as subtests are, keeps all its outcomes) are compared with
plain -n1's: the differences are printed with the other side's message, and so are the wall
times, their ratio to plain at the same -n and the difference per test (ms/test). Plain -n2
against plain -n1 shows what varies without the sandbox (order, randomness). It reports and
does not judge: the README's "What differs in the sandbox" says which differences are
expected and why.

    python tests/benchmarks/bench_suites.py [--projects attrs,click] [--scopes test,session]
                                            [--cache DIR] [--json]

Needs PyPI (pip download), this checkout installed editable (`pip install -e .`: its
egg-info and native core), root or a host where the sandbox runs, and minutes: the sandboxed
runs of a large suite take several times its plain time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import venv
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Project:
    name: str                 # on PyPI
    version: str
    requirements: tuple[str, ...] = ()  # what its tests import, besides pytest
    tests: tuple[str, ...] = ("tests",)  # pytest's arguments, in the unpacked sdist
    sandboxed: tuple[str, ...] = ()     # more arguments for the sandboxed runs
    options: tuple[str, ...] = ()       # more arguments for every run


# Hypothesis keeps its examples in .hypothesis: a body may write there only when told
HYPOTHESIS_DB = ("--minictr-writable", ".hypothesis")
# Under `filterwarnings = error`, pytest 9's deprecation of generators given to parametrize,
# and marks of plugins not installed (pytest-cov's no_cover), fail whole modules' collection
PYTEST_9 = ("-W", "ignore::pytest.PytestRemovedIn10Warning",
            "-W", "ignore::pytest.PytestUnknownMarkWarning")
PROJECTS = (
    Project("attrs", "25.3.0", ("hypothesis==6.131.0", "pympler==1.1", "cloudpickle==3.1.1"),
            sandboxed=HYPOTHESIS_DB),
    Project("toolz", "1.0.0", tests=("toolz/tests",)),
    Project("click", "8.1.8", options=PYTEST_9),
    Project("jinja2", "3.1.6", ("trio==0.29.0",)),
    Project("more-itertools", "10.7.0"),
    Project("cachetools", "5.5.2"),
    Project("python-dateutil", "2.9.0.post0",
            ("hypothesis==6.131.0", "freezegun==1.5.1", "six==1.17.0"), sandboxed=HYPOTHESIS_DB,
            options=PYTEST_9),
)
SCOPES = ("test", "module", "session")
SANDBOX = ("--minictr-sandbox-tests",)
RUN_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Outcome:
    outcomes: tuple[str, ...]   # sorted: one per report the JUnit file holds for the test
    message: str                # the first failure's, error's or skip's message


@dataclass(frozen=True)
class Run:
    mode: str
    workers: int
    wall_s: float
    returncode: int
    results: dict[str, Outcome]
    tail: str                   # the last lines pytest printed

    @property
    def label(self) -> str:
        return f"{self.mode} -n{self.workers}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projects", default=",".join(p.name for p in PROJECTS),
                        help="names, separated by commas (default: all)")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="sdists, venvs and runs (default: %(default)s)")
    parser.add_argument("--scopes", default="test",
                        help="sandbox scopes to run, separated by commas (default: %(default)s;"
                             " test, module, session)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
    if not scopes or set(scopes) - set(SCOPES):
        parser.error(f"--scopes {args.scopes!r}: expected some of {', '.join(SCOPES)}")
    known = {p.name: p for p in PROJECTS}
    wanted = [name.strip() for name in args.projects.split(",") if name.strip()]
    if unknown := [name for name in wanted if name not in known]:
        parser.error(f"--projects: unknown {unknown} (known: {sorted(known)})")
    report = {}
    for name in wanted:
        runs = bench_project(known[name], args.cache.resolve(), scopes)
        report[name] = summary(runs)
        if not args.json:
            print_project(known[name], runs)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "minictr" / "bench-suites"


def bench_project(project: Project, cache: Path, scopes: list[str]) -> list[Run]:
    sdist = download(project, cache / "sdists")
    python = project_venv(project, sdist, cache / "venvs")
    runs = []
    modes = ["plain", *(("sandboxed" if scope == "test" else f"sandboxed:{scope}")
                        for scope in scopes)]
    for mode, workers in ((mode, workers) for mode in modes for workers in (1, 2)):
        where = cache / "runs" / f"{project.name}-{project.version}" / f"{mode}-n{workers}"
        source = unpack(sdist, where)
        runs.append(run_suite(project, python, source, mode, workers, where / "junit.xml"))
        print(f"  {project.name} {runs[-1].label}: {runs[-1].wall_s:.1f} s", file=sys.stderr)
    return runs


def download(project: Project, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    spelled = {project.name.lower().replace("-", "_"), project.name.lower()}
    found = [path for path in into.iterdir()
             if path.name.endswith(f"-{project.version}.tar.gz")
             and path.name[:-len(f"-{project.version}.tar.gz")].lower() in spelled]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"{project.name}=={project.version}",
                        "-d", str(into)], check=True)
        return download(project, into)
    return found[0]


def project_venv(project: Project, sdist: Path, venvs: Path) -> Path:
    """The project's venv (made once: a marker file says it is complete, with what); its
    python."""
    home = venvs / f"{project.name}-{project.version}"
    python = home / "bin" / "python"
    done = home / "bench-suites-ready"
    tools = [f"{name}=={importlib.metadata.version(name)}" for name in ("pytest", "pytest-xdist")]
    wanted = " ".join([*tools, *project.requirements])
    if done.exists() and done.read_text() == wanted:
        return python
    shutil.rmtree(home, ignore_errors=True)
    venv.create(home, with_pip=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *tools, *project.requirements,
                    str(sdist)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], check=True, capture_output=True, text=True)
    # the plugin of this checkout (its egg-info names the entry point), with the native core
    # its editable install built
    Path(site.stdout.strip(), "minictr-bench.pth").write_text(f"{REPO}\n")
    done.write_text(wanted)
    return python


def unpack(sdist: Path, where: Path) -> Path:
    """A fresh copy of the sdist for each run: no run sees what another left (.hypothesis,
    caches, files a test wrote)."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(where, filter="data")
    (top,) = where.iterdir()
    return top


def run_suite(project: Project, python: Path, source: Path, mode: str, workers: int,
              junit: Path) -> Run:
    """Its own session, so that a run that hangs is killed with all it started."""
    sandboxed, _, scope = mode.partition(":")
    argv = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
            f"--junitxml={junit}", *project.options,
            *((*SANDBOX, *project.sandboxed) if sandboxed == "sandboxed" else ()),
            *(("--minictr-sandbox-scope", scope) if scope else ()), *project.tests]
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "MINICTR_"))}
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=source, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    wall = time.monotonic() - start
    tail = (output.decode(errors="replace").splitlines() or [""])[-1][:200]
    results = read_junit(junit) if junit.exists() else {}
    return Run(mode, workers, wall, proc.returncode, results, tail)


def read_junit(path: Path) -> dict[str, Outcome]:
    reported: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(path).iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        reported.setdefault(key, []).append(case_outcome(case))
    return {key: Outcome(tuple(sorted(o for o, _ in pairs)),
                         next((m for o, m in pairs if o != "passed"), ""))
            for key, pairs in reported.items()}


def case_outcome(case: ET.Element) -> tuple[str, str]:
    for child in case:
        message = (child.get("message") or child.text or "").strip()
        if child.tag == "failure":
            return "failed", message
        if child.tag == "error":
            return "error", message
        if child.tag == "skipped":
            return ("xfailed" if child.get("type") == "pytest.xfail" else "skipped"), message
    return "passed", ""


def differences(base: Run, other: Run) -> list[tuple[str, str, str, str]]:
    """(test, base's outcome, other's, other's message or base's) for each that differs."""
    rows = []
    for key in sorted(base.results.keys() | other.results.keys()):
        a, b = base.results.get(key), other.results.get(key)
        if a is None or b is None or a.outcomes != b.outcomes:
            rows.append((key, show(a), show(b), (b.message if b and b.message
                                                 else a.message if a else "")))
    return rows


def show(outcome: Outcome | None) -> str:
    return "+".join(outcome.outcomes) if outcome is not None else "absent"


def counts(run: Run) -> dict[str, int]:
    return dict(Counter(o for outcome in run.results.values() for o in outcome.outcomes))


def ratio(run: Run, runs: list[Run]) -> float:
    plain = next(r for r in runs if r.mode == "plain" and r.workers == run.workers)
    return run.wall_s / plain.wall_s


def per_test_ms(run: Run, runs: list[Run]) -> float:
    """Wall time over plain's at the same -n, per test (the suite's cost of the sandbox)."""
    plain = next(r for r in runs if r.mode == "plain" and r.workers == run.workers)
    return 1000 * (run.wall_s - plain.wall_s) / max(len(plain.results), 1)


def summary(runs: list[Run]) -> dict:
    base = runs[0]
    return {run.label: {"wall_s": round(run.wall_s, 2), "ratio": round(ratio(run, runs), 2),
                        "extra_ms_per_test": round(per_test_ms(run, runs), 1),
                        "returncode": run.returncode, "counts": counts(run),
                        "differences": [list(row) for row in differences(base, run)]}
            for run in runs}


def print_project(project: Project, runs: list[Run]) -> None:
    print(f"\n== {project.name} {project.version}")
    print(f"{'run':<24}{'wall s':>9}{'ratio':>8}{'ms/test':>9}{'exit':>6}  outcomes")
    for run in runs:
        outcomes = ", ".join(f"{n} {o}" for o, n in sorted(counts(run).items()))
        print(f"{run.label:<24}{run.wall_s:>9.1f}{ratio(run, runs):>8.2f}"
              f"{per_test_ms(run, runs):>9.1f}{run.returncode:>6}  {outcomes or run.tail}")
    for run in runs[1:]:
        rows = differences(runs[0], run)
        print(f"-- {run.label} against {runs[0].label}: {len(rows)} differ")
        for key, a, b, message in rows:
            first = message.splitlines()[0][:160] if message else ""
            print(f"   {key}: {a} -> {b}  {first}")


if __name__ == "__main__":
    sys.exit(main())
