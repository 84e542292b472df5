"""Per-test cost of a sandboxed test body (#16), against the same test unmarked and against a
bare `os.fork` per test (pytest-forked's approach, without its report's trip back).

What it runs: in a temp dir, generated test files of N trivial parametrized tests each,

  marked    @pytest.mark.container                 # its body forked into its sandbox
            def test_marked(i): assert i >= 0
  unmarked  def test_unmarked(i): assert i >= 0     # the baseline: in the worker
  forked    def test_forked(i):                     # the peer: the cheapest isolation there is
                pid = os.fork()                     # a child that runs nothing and exits
                if pid == 0: os._exit(0)
                assert os.waitpid(pid, 0)[1] == 0
  served    as marked, with a module's service running (python3 http.server): its address
            is relayed into each body

from workers of ~200 MB (a conftest touches 200 MB of ballast: fork cost grows with the
parent's page tables), each with `-n 1` and `-n 2` (xdist). The clocks and the figures are
`bench_plugin`'s (one monotonic stamp after each test's teardown, per worker):

  overhead(kind) = median ms per test (kind -n1) - median (unmarked -n1)
  ratio          = overhead(marked) / overhead(forked)   (aim: <= 1.5)

Then the shared scopes (#27): a suite of 10 modules (a module-scoped fixture each, the same
trivial tests, N in all) run whole, plain and with `--minictr-sandbox-tests` at each
`--minictr-sandbox-scope`, at -n1 and -n2; the figure is pytest's wall time (start-up,
collection and every sandbox's start included) over the plain run's (aim: session <= 1.2,
module <= 1.5).

    python tests/benchmarks/bench_sandbox.py [--tests 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plugin import CONFTEST, RunFailed, measure, run_pytest

HEAD = "import os\nimport pytest\n\n@pytest.mark.parametrize('i', range({n}))\n"
TESTS = {
    "unmarked": HEAD + "def test_unmarked(i):\n    assert i >= 0\n",
    "marked": HEAD.replace("@pytest", "@pytest.mark.container\n@pytest", 1)
    + "def test_marked(i):\n    assert i >= 0\n",
    "forked": HEAD + ("def test_forked(i):\n    pid = os.fork()\n    if pid == 0:\n"
                      "        os._exit(0)\n    assert os.waitpid(pid, 0)[1] == 0\n"),
    # marked, with one service running: its address is relayed into each body (#26)
    "served": ("import os\nimport pytest\n\n@pytest.fixture(scope='module', autouse=True)\n"
               "def web(minictr_service):\n    return minictr_service(recipe='python3', "
               "ports=[8000], command=['python3', '-m', 'http.server', '8000'], "
               "wait_for_port=8000)\n\n"
               + HEAD.replace("@pytest", "@pytest.mark.container\n@pytest", 1).split("\n\n", 1)[1]
               + "def test_served(i):\n    assert i >= 0\n"),
}
MODULES = 10
MODULE = ("import pytest\n\n@pytest.fixture(scope='module')\ndef numbers():\n"
          "    return list(range(100))\n\n@pytest.mark.parametrize('i', range({n}))\n"
          "def test_in_module(numbers, i):\n    assert sum(numbers) + i >= 0\n")
SCOPES = {"plain": [], **{scope: ["--minictr-sandbox-tests", f"--minictr-sandbox-scope={scope}"]
                          for scope in ("session", "module", "test")}}
# written byte by byte: calloc's untouched pages would cost a fork nothing
BALLAST = "BALLAST = bytearray(b'\\x01') * (200 * 1024 * 1024)\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.tests < 2:
        parser.error("--tests: at least 2")
    with tempfile.TemporaryDirectory(prefix="minictr-bench-sandbox-") as tmp:
        work = Path(tmp)
        (work / "pytest.ini").write_text("[pytest]\n")
        (work / "conftest.py").write_text(BALLAST + CONFTEST)
        for kind, text in TESTS.items():
            (work / f"test_{kind}.py").write_text(text.format(n=args.tests))
        try:
            run_pytest(work, ["test_marked.py::test_marked[0]"], None, timeout=300)  # warm-up
            rows = {f"{kind} -n{workers}": measure(work, kind, workers, args.tests)
                    for kind in TESTS for workers in (1, 2)}
            suite = measure_scopes(work, args.tests)
        except RunFailed as failure:
            print(f"FAILED {failure}", file=sys.stderr)
            return 1
    base = rows["unmarked -n1"]["median_ms"]
    report = {"kernel": os.uname().release, "cpus": os.cpu_count(), "tests": args.tests,
              "configurations": rows,
              "overhead_ms": {kind: rows[f"{kind} -n1"]["median_ms"] - base
                              for kind in ("marked", "forked", "served")}}
    report["ratio"] = report["overhead_ms"]["marked"] / report["overhead_ms"]["forked"]
    report["suite_wall_s"] = suite
    report["suite_ratio"] = {name: wall / suite[f"plain -n{name[-1]}"]
                             for name, wall in suite.items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"kernel {report['kernel']}, {report['cpus']} CPUs, {args.tests} tests each, "
          "workers of ~200 MB\n")
    print(f"{'configuration':<15}{'median ms':>12}{'tests/s':>12}{'cpu ms/test':>14}"
          f"{'other cores':>14}")
    for name, row in rows.items():
        print(f"{name:<15}{row['median_ms']:>12.2f}{row['tests_per_s']:>12.1f}"
              f"{row['cpu_ms_per_test']:>14.2f}{row['other_cores']:>14.2f}")
    marked, forked = report["overhead_ms"]["marked"], report["overhead_ms"]["forked"]
    print(f"\nper-test overhead over unmarked (-n1 medians): sandboxed {marked:.2f} ms, "
          f"bare fork {forked:.2f} ms; ratio {report['ratio']:.2f} (aim <= 1.5); "
          f"sandboxed with a service {report['overhead_ms']['served']:.2f} ms")
    print(f"\nwhole suite ({MODULES} modules, {args.tests} tests), pytest wall s and x plain:")
    for name, wall in suite.items():
        print(f"  {name:<12}{wall:>8.2f} s{report['suite_ratio'][name]:>8.2f}x")
    print("  (aim: session <= 1.2x, module <= 1.5x)")
    return 0


def measure_scopes(work: Path, tests: int) -> dict[str, float]:
    """pytest's wall time for the suite of MODULES modules, per scope and -n."""
    suite = work / "suite"
    suite.mkdir()
    for index in range(MODULES):
        (suite / f"test_module_{index}.py").write_text(
            MODULE.format(n=max(1, tests // MODULES)))
    return {f"{scope} -n{workers}": run_pytest(work, ["suite", "-n", str(workers), *args],
                                               None, timeout=120 + 0.5 * tests)
            for scope, args in SCOPES.items() for workers in (1, 2)}


if __name__ == "__main__":
    sys.exit(main())
