"""Batches of grading jobs (issue #28, item 5): `Grader.map`/`imap_unordered` over a pool of
warm workers, a worker lost mid-job, and `minictr grade` with a bad line, --resume and Ctrl-C
(output whole, nothing left running)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pytest_minictr.grading import Grader, Job

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the limits of grading need cgroups "
                                "(root, or a delegated cgroup v2)")
REPO = Path(__file__).resolve().parent.parent


def doubling(job_id: str, number: int, source: str = "print(int(input()) * 2)") -> dict:
    return {"id": job_id, "language": "python3", "files": {"main.py": source},
            "cases": [{"stdin": f"{number}\n", "expected_stdout": f"{number * 2}\n"}],
            "limits": {"timeout": 20, "memory": "64M"}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_map_keeps_the_order_and_imap_unordered_gives_each_once(cache):
    jobs = [Job.from_json(doubling(f"j{i}", i)) for i in range(6)]
    jobs[3] = Job.from_json(doubling("j3", 3, "print(0)"))
    with Grader(workers=2, cache_dir=cache) as grader:
        results = grader.map(jobs)
        assert [r.id for r in results] == [f"j{i}" for i in range(6)]
        assert [r.verdict for r in results] == ["ok"] * 3 + ["wrong_answer"] + ["ok"] * 2
        assert sorted(r.id for r in grader.imap_unordered(jobs)) == sorted(j.id for j in jobs)
        for _ in grader.imap_unordered(jobs):
            break  # what was still running is stopped, not mixed into the next map
        assert [r.id for r in grader.map(jobs[:2])] == ["j0", "j1"]


def test_a_job_whose_worker_dies_is_retried_then_infra_error(cache, tmp_path):
    slow = Job.from_json(doubling("slow", 1, "import time; time.sleep(3); print(2)"))
    for retries, verdict in ((1, "ok"), (0, "infra_error")):
        with Grader(workers=1, cache_dir=cache, retries=retries, workdir=str(tmp_path)) \
                as grader:
            results = grader.imap_unordered([slow])
            killer = _kill_the_worker_soon(grader)
            result = next(results)
            killer.join()
            assert result.verdict == verdict, result
    assert "the worker grading it died" in result.error
    assert os.listdir(tmp_path) == []  # the killed workers' workspaces: the grader removed them


def _kill_the_worker_soon(grader):
    import threading

    def kill() -> None:
        while not grader._pool or grader._pool[0].task is None:
            time.sleep(0.05)
        time.sleep(1)
        os.kill(grader._pool[0].process.pid, signal.SIGKILL)
    killer = threading.Thread(target=kill)
    killer.start()
    return killer


def minictr_grade(*args, **options):
    return subprocess.run([sys.executable, "-m", "pytest_minictr", "grade", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **options)


def test_the_cli_names_a_bad_line_and_grades_the_rest(tmp_path):
    lines = [json.dumps(doubling(f"j{i}", i)) for i in range(3)]
    lines[1:1] = ["{not json", json.dumps({"id": "x", "language": "python3", "cases": []})]
    lines.append(json.dumps(doubling("j0", 7)))
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    done = minictr_grade(str(tmp_path / "jobs.jsonl"), "--workers", "2")
    assert done.returncode == 1
    assert "line 2:" in done.stderr and "line 3: job 'x': cases" in done.stderr
    assert "line 6: job 'j0': id: already the id of line 1" in done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted((r["id"], r["verdict"]) for r in results) == [(f"j{i}", "ok") for i in range(3)]
    assert "\r" not in done.stderr  # no progress line on a pipe unless asked


def test_the_cli_resumes_where_a_cut_batch_stopped(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(doubling(f"j{i}", i)) + "\n" for i in range(5)))
    output = tmp_path / "results.jsonl"
    first = minictr_grade(str(jobs), "-o", str(output), "--workers", "2")
    assert first.returncode == 0, first.stderr
    lines = output.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["id"] in ("j0", "j3")]
    # what a crash leaves: two whole lines and one cut short
    output.write_text("".join(kept) + lines[0][:30])
    again = minictr_grade(str(jobs), "-o", str(output), "--resume", "--progress")
    assert again.returncode == 0, again.stderr
    ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert sorted(ids) == [f"j{i}" for i in range(5)]
    assert "3/3 jobs" in again.stderr and "ok 3" in again.stderr


def test_ctrl_c_stops_cleanly_with_the_output_whole(tmp_path):
    tag = uuid.uuid4().hex
    sleeper = "import time; time.sleep(4)\nprint(int(input()) * 2)"
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({**doubling(f"j{i}", i, sleeper),
                                        "run": ["python3", "main.py", tag]} if i else
                                       doubling("j0", 0)) + "\n" for i in range(8)))
    output = tmp_path / "results.jsonl"
    workdir = tmp_path / "work"
    workdir.mkdir()
    batch = subprocess.Popen([sys.executable, "-m", "pytest_minictr", "grade", str(jobs), "-o",
                              str(output), "--workers", "2", "--workdir", str(workdir)],
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not output.exists() or not output.read_text():
        assert time.monotonic() < deadline and batch.poll() is None
        time.sleep(0.05)
    while not _running(tag):  # the sleepers are in their containers
        assert time.monotonic() < deadline
        time.sleep(0.05)
    batch.send_signal(signal.SIGINT)
    assert batch.wait(timeout=30) == 130
    assert "interrupted" in batch.stderr.read()
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert 1 <= len(results) < 8 and output.read_text().endswith("\n")
    time.sleep(0.5)
    assert _running(tag) == []
    assert os.listdir(workdir) == []


def _running(tag: str) -> list[str]:
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if tag in (process / "cmdline").read_bytes().decode(errors="replace"):
                found.append(process.name)
        except OSError:
            continue
    return found
