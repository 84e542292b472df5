"""Per-test cost of the pytest plugin's `container` fixture, and the pytest-xdist speed-up.

What it runs: in a temp dir, generated test files of N parametrized tests each:

  container  def test_container(container, i):
                 assert container.run(["echo", "hi"]).stdout == b"hi\\n"
  plain      def test_plain(i):      # the baseline peer: the same command, no container
                 assert subprocess.run(["echo", "hi"], capture_output=True).stdout == b"hi\\n"
  bwrap      def test_bwrap(i):      # the sandbox peer, where bwrap is installed: the same
                 subprocess.run(["bwrap", "--unshare-all", ..., "echo", "hi"])  # in a sandbox

each with `python -m pytest -q -p no:cacheprovider -n 1` and `-n 2` (xdist), in subprocesses
sharing one rootfs cache, built by a 1-test warm-up run before anything is timed.

How it measures: a conftest.py next to the tests records `time.monotonic()` (one clock for all
processes) when `pytest_runtest_protocol` returns, i.e. after each test's teardown, so fixture
set-up and teardown are counted, and writes the list to a file per worker at the end of its
session. Measuring from inside leaves out what is paid once per run (interpreter and pytest
start-up, collection, xdist workers, the launcher's start in the first test):
  tests/s      (N - 1) / span, span = first test finished to last test finished, all workers
  median ms    median of the differences between consecutive finishes on the same worker
Then: overhead = median(container -n1) - median(plain -n1), the plugin's cost per test over
starting the command without a container (target <= 5 ms), and speed-up = tests/s(container
-n2) / tests/s(container -n1) (target >= 1.8 on 2 cores).

Also per configuration: the CPU time of the whole run (pytest, workers, launchers, containers;
start-up included, so read it at large N) per test; the average cores the machine kept busy
during the span ("span cores": start-up left out; kernel threads cleaning up after containers
in), which bounds the xdist speed-up (a -n1 run that keeps 1.5 of 2 CPUs busy can gain at most
2/1.5 from a second worker); and the average cores used meanwhile by anything else (other
jobs, and kernel threads, some cleaning up after our containers): a figure taken beside a busy
neighbour is not worth comparing. The script reports and does not judge: it exits 0
when every pytest run passed, 1 if one failed (its output's tail is shown).

    python tests/benchmarks/bench_plugin.py [--tests 2000] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAIL = 3000  # characters of a failed run's output shown
TESTS = {
    "container": ("import pytest\n\n@pytest.mark.parametrize('i', range({n}))\n"
                  "def test_container(container, i):\n"
                  "    assert container.run(['echo', 'hi']).stdout == b'hi\\n'\n"),
    "plain": ("import subprocess\nimport pytest\n\n@pytest.mark.parametrize('i', range({n}))\n"
              "def test_plain(i):\n"
              "    done = subprocess.run(['echo', 'hi'], capture_output=True)\n"
              "    assert done.stdout == b'hi\\n'\n"),
    # the host's / read-only, as our base is; its own /proc, /dev, /tmp, every namespace
    "bwrap": ("import subprocess\nimport pytest\n\n@pytest.mark.parametrize('i', range({n}))\n"
              "def test_bwrap(i):\n"
              "    done = subprocess.run(['bwrap', '--unshare-all', '--die-with-parent',\n"
              "                           '--ro-bind', '/', '/', '--proc', '/proc',"
              " '--dev', '/dev',\n"
              "                           '--tmpfs', '/tmp', 'echo', 'hi'], capture_output=True)\n"
              "    assert done.stdout == b'hi\\n'\n"),
}
# Around pytest_runtest_protocol, not in pytest_runtest_logfinish: the xdist controller also
# calls that one for its workers' tests. Kept in memory and written once per worker, so
# recording costs no I/O between tests.
CONFTEST = """\
import os, time
import pytest
_finished = []
_TICK = os.sysconf("SC_CLK_TCK")

def busy_cpu_s():  # the machine's, as in the script; ~20 us a test
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield  # set-up, call, teardown and their reports
    _finished.append((time.monotonic(), busy_cpu_s()))

def pytest_sessionfinish(session):
    out = os.environ.get("BENCH_TIMES_DIR")
    if out and _finished:  # the xdist controller runs no test: it writes nothing
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(out, worker), "w") as f:
            f.write("\\n".join(f"{t!r} {busy!r}" for t, busy in _finished))
"""


class RunFailed(Exception):
    pass


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (user, system, irq; not idle, steal)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of our reaped descendants: pytest, its workers, their launchers, the
    containers' inits and commands (each is reaped by its parent). Not kernel threads."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pytest(work: Path, args: list[str], times_dir: Path | None, timeout: float) -> float:
    """Run pytest in `work`; return its wall time. Its own session, so that a run that hangs
    is killed with everything it started (xdist workers, launchers, containers)."""
    env = {**os.environ, "MINICTR_CACHE_DIR": str(work / "cache")}
    env.pop("PYTEST_ADDOPTS", None)
    if times_dir is not None:
        env["BENCH_TIMES_DIR"] = str(times_dir)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RunFailed(f"{' '.join(argv[1:])}: timed out after {timeout:.0f} s\n"
                        f"{output.decode(errors='replace')[-TAIL:]}") from None
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(argv[1:])}: exit {proc.returncode}\n"
                        f"{output.decode(errors='replace')[-TAIL:]}")
    return time.monotonic() - start


def measure(work: Path, kind: str, workers: int, n: int) -> dict:
    times_dir = work / f"times-{kind}-{workers}"
    times_dir.mkdir()
    own, busy = own_cpu_s(), busy_cpu_s()
    wall = run_pytest(work, [f"test_{kind}.py", "-n", str(workers)], times_dir,
                      timeout=120 + 0.5 * n)
    per_worker = [[tuple(map(float, line.split())) for line in path.read_text().splitlines()]
                  for path in times_dir.iterdir()]
    finished = sorted(stamp for stamps in per_worker for stamp in stamps)
    if len(finished) != n:
        raise RunFailed(f"{kind} -n {workers}: {len(finished)} tests recorded, expected {n}")
    span = finished[-1][0] - finished[0][0]
    span_busy = finished[-1][1] - finished[0][1]
    own, busy = own_cpu_s() - own, busy_cpu_s() - busy
    steps = [b[0] - a[0] for stamps in per_worker for a, b in itertools.pairwise(stamps)]
    return {"tests": n, "workers_used": len(per_worker), "span_s": span,
            "tests_per_s": (n - 1) / span,
            "median_ms": statistics.median(steps) * 1000 if steps else None,
            "pytest_wall_s": wall, "cpu_ms_per_test": own / n * 1000,
            # what the machine did while the tests ran (start-up left out, neighbours in):
            # 2 CPUs over this bounds the xdist speed-up that adding workers can give
            "span_cores": span_busy / span if span else None,
            # Anything else that ran meanwhile (other jobs, kernel threads): noise to watch.
            "other_cores": max(0.0, busy - own) / wall}


def overhead(configurations: dict, kind: str) -> float:
    """Median ms per test of `kind` over the plain tests', both -n1."""
    return configurations[f"{kind} -n1"]["median_ms"] - configurations["plain -n1"]["median_ms"]


def speedup(configurations: dict, kind: str) -> float:
    return (configurations[f"{kind} -n2"]["tests_per_s"]
            / configurations[f"{kind} -n1"]["tests_per_s"])


def print_table(report: dict) -> None:
    print(f"kernel {report['kernel']}, {report['cpus']} CPUs, python {report['python']}, "
          f"{report['tests']} tests per configuration\n")
    columns = {"tests": "tests", "span_s": "span s", "tests_per_s": "tests/s",
               "median_ms": "median ms", "pytest_wall_s": "pytest wall s",
               "cpu_ms_per_test": "cpu ms/test", "span_cores": "span cores",
               "other_cores": "other cores"}
    print(f"{'configuration':<15}" + "".join(f"{title:>14}" for title in columns.values()))
    for name, row in report["configurations"].items():
        print(f"{name:<15}" + "".join(f"{row[key]:>14.2f}" if isinstance(row[key], float)
                                      else f"{row[key] or '-':>14}" for key in columns))
    print(f"\ncontainer per-test overhead (median container -n1 - plain -n1): "
          f"{report['overhead_ms']:.2f} ms (target <= 5 ms)")
    print(f"xdist speed-up (tests/s container -n2 / -n1): {report['speedup']:.2f} "
          f"(target >= 1.8 on 2 cores)")
    if "bwrap_overhead_ms" in report:
        print(f"  bwrap, the same way: overhead {report['bwrap_overhead_ms']:.2f} ms, "
              f"speed-up {report['bwrap_speedup']:.2f}")
    else:
        print("  (bwrap is not installed: no sandbox peer)")
    for kind in report["kinds"]:
        cores = report["configurations"][f"{kind} -n1"]["span_cores"]
        print(f"  {kind} -n1 kept {cores:.2f} of {report['cpus']} CPUs busy: -n2 can give at "
              f"most {report['cpus'] / cores:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.tests < 2:
        parser.error("--tests: at least 2")  # a span needs two ends

    kinds = [kind for kind in TESTS if kind != "bwrap" or shutil.which("bwrap")]
    with tempfile.TemporaryDirectory(prefix="minictr-bench-plugin-") as tmp:
        work = Path(tmp)
        (work / "pytest.ini").write_text("[pytest]\n")  # rootdir here: no outer config applies
        (work / "conftest.py").write_text(CONFTEST)
        for kind in kinds:
            (work / f"test_{kind}.py").write_text(TESTS[kind].format(n=args.tests))
        try:
            # Builds the rootfs into the shared cache, so no timed run pays for it.
            run_pytest(work, ["test_container.py::test_container[0]"], None, timeout=300)
            configurations = {f"{kind} -n{workers}": measure(work, kind, workers, args.tests)
                              for kind in kinds for workers in (1, 2)}
        except RunFailed as failure:
            print(f"FAILED {failure}", file=sys.stderr)
            return 1

    report = {"kernel": os.uname().release, "cpus": os.cpu_count(),
              "python": sys.version.split()[0], "tests": args.tests, "kinds": kinds,
              "configurations": configurations,
              "overhead_ms": overhead(configurations, "container"),
              "speedup": speedup(configurations, "container")}
    if "bwrap" in kinds:
        report["bwrap_overhead_ms"] = overhead(configurations, "bwrap")
        report["bwrap_speedup"] = speedup(configurations, "bwrap")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
