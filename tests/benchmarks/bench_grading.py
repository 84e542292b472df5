"""Grading throughput: trivial Python snippets in the python3 recipe, with limits, against
bwrap running the same snippet on the same rootfs.

  minictr      ContainerRuntime.run(python3 rootfs, ["python3", "-c", SNIPPET], memory 64M,
               pids 32, timeout 10, output 1M, layer 16M).wait(), one runtime per worker
  bwrap        bwrap --unshare-{pid,net,ipc,uts,cgroup} --die-with-parent --ro-bind ROOTFS /
               --proc /proc --dev /dev --tmpfs /tmp python3 -c SNIPPET  (no limits, no user
               namespace, no seccomp: bwrap as root, as lightly as it goes)
  bwrap+cg     the same in a cgroup of its own per run with the same memory and pids
               limits, read and removed after (as root only): what a tool on bwrap adds to
               measure and limit a run, still without a user namespace or seccomp

Each is run sequentially (1 worker) and by 2 worker processes at once; the figure is snippets
per second over the whole batch (worker start-up excluded: each worker warms up first), and
every verdict is checked.

Then the judge (issue #28, figures of item 8):

  batch        `minictr grade JOBS.jsonl --workers 2` over --jobs trivial python3 jobs (one
               case each, judged), the whole command timed, start-up included; against
               the same snippets through bwrap (as above) by a pool of 2 processes, and (as
               root) bwrap+cg the same way; each twice, in the order grade, the pools, the
               pools again in reverse, grade
  per case     a 20-case C job (grade_job on a warm runtime: one build, 20 containers) against
               its binary, compiled on the host, run 20 times bare (subprocess.run); the
               figure is the milliseconds each case costs beyond a bare run

The script reports and does not judge: it exits 1 only if a snippet or a job went wrong.

    python tests/benchmarks/bench_grading.py [--snippets 200] [--jobs 1000] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from pytest_minictr import ContainerRuntime, Limits, RootfsBuilder

SNIPPET = "print(sum(range(100)))"
EXPECTED = b"4950\n"
LIMITS = {"memory_limit": "64M", "pids_limit": 32, "timeout": 10, "output_limit": "1M",
          "layer_size": "16M"}
WARMUP = 5
CGROUP_LIMITS = Limits(memory=64 * 1024**2, pids=32)  # LIMITS' memory and pids


def minictr_worker(rootfs: str, count: int, start, results) -> None:
    with ContainerRuntime() as runtime:
        for _ in range(WARMUP):
            runtime.run(rootfs, ["python3", "-c", SNIPPET], **LIMITS).wait()
        start.wait()
        bad = 0
        for _ in range(count):
            result = runtime.run(rootfs, ["python3", "-c", SNIPPET], **LIMITS).wait()
            bad += result.verdict != "ok" or result.stdout != EXPECTED
        results.put((time.monotonic(), bad))


def bwrap_argv(rootfs: str) -> list[str]:
    return ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup", "--die-with-parent", "--ro-bind", rootfs, "/",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "python3", "-c", SNIPPET]


def bwrap_worker(rootfs: str, count: int, start, results) -> None:
    # no user namespace: the cache is owned by minictr's mapped range (see idmap), which one
    # of bwrap's own would not map; as root bwrap needs none
    argv = bwrap_argv(rootfs)
    for _ in range(WARMUP):
        subprocess.run(argv, capture_output=True)
    start.wait()
    bad = 0
    for _ in range(count):
        done = subprocess.run(argv, capture_output=True)
        bad += done.returncode != 0 or done.stdout != EXPECTED
    results.put((time.monotonic(), bad))


def bwrap_cgroup_worker(rootfs: str, count: int, start, results) -> None:
    argv = bwrap_argv(rootfs)
    for index in range(WARMUP):
        bwrap_in_cgroup(argv, f"warm-{index}")
    start.wait()
    bad = sum(not bwrap_in_cgroup(argv, str(index)) for index in range(count))
    results.put((time.monotonic(), bad))


def bwrap_in_cgroup(argv: list[str], name: str) -> bool:
    """bwrap in a cgroup of its own (made, its limits set, joined before exec, read and
    removed: our backend's), as a tool built on bwrap would add it to limit and measure a
    run; still no user namespace (see bwrap_worker) and no seccomp filter."""
    from pytest_minictr.host import cgroups
    group = _cgroup_backend().create(cgroups.group_name(f"bench-{name}"), CGROUP_LIMITS)
    try:
        done = subprocess.run(argv, capture_output=True,
                              preexec_fn=lambda: group.join(os.getpid()))
        group.stats()
    finally:
        group.discard()
    return done.returncode == 0 and done.stdout == EXPECTED


@functools.lru_cache(maxsize=1)
def _cgroup_backend():
    from pytest_minictr.host import cgroups
    return cgroups.detect()


def measure(worker, rootfs: str, snippets: int, workers: int) -> dict:
    start = multiprocessing.Barrier(workers + 1)
    results = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=worker, args=(rootfs, snippets // workers,
                                                              start, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    start.wait()
    began = time.monotonic()
    ends = [results.get() for _ in processes]
    for process in processes:
        process.join()
    span = max(end for end, _ in ends) - began
    done = snippets // workers * workers
    return {"snippets": done, "seconds": round(span, 3),
            "per_second": round(done / span, 1), "wrong": sum(bad for _, bad in ends)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snippets", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minictr-bench-") as cache:
        started = time.perf_counter()
        rootfs = str(RootfsBuilder(cache_dir=cache).build(recipe="python3"))
        cold = time.perf_counter() - started
        started = time.perf_counter()
        RootfsBuilder(cache_dir=cache).build(recipe="python3")
        cached = time.perf_counter() - started
        report = {"rootfs_cold_s": round(cold, 3), "rootfs_cached_ms": round(cached * 1e3, 3),
                  "runs": {}}
        peers = {"minictr": minictr_worker}
        if shutil.which("bwrap"):
            peers["bwrap"] = bwrap_worker
            if os.geteuid() == 0:
                peers["bwrap+cg"] = bwrap_cgroup_worker
        for workers in (1, 2):
            for name, worker in peers.items():
                report["runs"][f"{name} x{workers}"] = measure(worker, rootfs, args.snippets,
                                                                workers)
        report["judge"] = measure_judge(rootfs, args.jobs, cache)
    runs = report["runs"]
    for workers in (1, 2):
        for peer in ("bwrap", "bwrap+cg"):
            if f"{peer} x{workers}" in runs:
                report[f"ratio x{workers} (minictr/{peer}, snippets/s)"] = round(
                    runs[f"minictr x{workers}"]["per_second"]
                    / runs[f"{peer} x{workers}"]["per_second"], 2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if any(row["wrong"] for row in runs.values()) or report["judge"]["wrong"] else 0
    else:
        print(f"python3 recipe: cold build {report['rootfs_cold_s']} s, cached "
              f"{report['rootfs_cached_ms']} ms; snippet {SNIPPET!r}, limits {LIMITS}")
        for name, row in runs.items():
            print(f"{name:<12} {row['per_second']:>7.1f} snippets/s  ({row['snippets']} in "
                  f"{row['seconds']} s, {row['wrong']} wrong)")
        for key, value in report.items():
            if key.startswith("ratio"):
                print(f"{key}: {value}")
        for key, value in report["judge"].items():
            print(f"judge: {key}: {value}")
    return 1 if any(row["wrong"] for row in runs.values()) or report["judge"]["wrong"] else 0


def measure_judge(rootfs: str, jobs: int, cache: str) -> dict:
    # the whole batch each time (each start-up counted once, as a user's batch pays it once),
    # in the order grade, the pools, the pools again in reverse, grade: a machine whose load
    # drifts during the run weighs on each alike
    pools = ({"bwrap pool": False, "bwrap+cg pool": True} if os.geteuid() == 0
             else {"bwrap pool": False}) if shutil.which("bwrap") else {}
    batches = [grade_batch(jobs, cache)]
    runs: dict[str, list[dict]] = {name: [] for name in pools}
    for name in [*pools, *reversed(pools)]:
        runs[name].append(bwrap_pool(rootfs, jobs, cgroup=pools[name]))
    batches.append(grade_batch(jobs, cache))
    cases = per_case_overhead(cache)
    seconds = sum(batch["seconds"] for batch in batches)
    report = {"grade_jobs_per_s": round(2 * jobs / seconds, 1),
              "grade_seconds": round(seconds / 2, 3),
              "wrong": sum(batch["wrong"] for batch in batches) + cases["wrong"], **cases}
    for name, done in runs.items():
        pool_seconds = sum(run["seconds"] for run in done)
        report[f"{name}_jobs_per_s"] = round(2 * jobs / pool_seconds, 1)
        report[f"ratio (grade/{name}, jobs/s)"] = round(pool_seconds / seconds, 2)
        report["wrong"] += sum(run["wrong"] for run in done)
    return report


def grade_batch(jobs: int, cache: str) -> dict:
    job = {"language": "python3", "files": {"main.py": SNIPPET},
           "cases": [{"expected_stdout": EXPECTED.decode()}],
           "limits": {"memory": "64M", "pids": 32, "timeout": 10, "output": "1M"}}
    with tempfile.TemporaryDirectory(prefix="minictr-bench-") as place:
        path = os.path.join(place, "jobs.jsonl")
        with open(path, "w") as out:
            out.writelines(json.dumps({"id": f"j{i}", **job}) + "\n" for i in range(jobs))
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest_minictr", "grade", path,
                               "--workers", "2"], capture_output=True, text=True,
                              env={**os.environ, "MINICTR_CACHE_DIR": cache})
        span = time.monotonic() - began
    verdicts = [json.loads(line)["verdict"] for line in done.stdout.splitlines()]
    return {"seconds": round(span, 3), "per_second": round(jobs / span, 1),
            "wrong": jobs - verdicts.count("ok")}


def _bwrap_once(argv: list[str]) -> bool:
    done = subprocess.run(argv, capture_output=True)
    return done.returncode == 0 and done.stdout == EXPECTED


def _bwrap_in_cgroup_once(task: tuple[list[str], int]) -> bool:
    return bwrap_in_cgroup(task[0], f"pool-{task[1]}")


def bwrap_pool(rootfs: str, jobs: int, cgroup: bool = False) -> dict:
    argv = bwrap_argv(rootfs)
    began = time.monotonic()
    with multiprocessing.Pool(2) as pool:  # its start-up counted, as the grader's is
        passed = pool.map(_bwrap_in_cgroup_once, [(argv, index) for index in range(jobs)]) \
            if cgroup else pool.map(_bwrap_once, [argv] * jobs)
    span = time.monotonic() - began
    return {"seconds": span, "wrong": passed.count(False)}


C_SOURCE = "#include <stdio.h>\nint main(void){ int x; if (scanf(\"%d\", &x) != 1) " \
           "return 1; printf(\"%d\\n\", 2 * x); return 0; }\n"


def per_case_overhead(cache: str, cases: int = 20) -> dict:
    from pytest_minictr.grading import Job, grade_job
    job = Job.from_json({"id": "c20", "language": "c", "files": {"main.c": C_SOURCE},
                         "cases": [{"id": str(i), "stdin": f"{i}\n",
                                    "expected_stdout": f"{2 * i}\n"} for i in range(cases)]})
    builder = RootfsBuilder(cache_dir=cache)
    with ContainerRuntime() as runtime:
        grade_job(runtime, job, builder)  # warm: the rootfs built, the launcher started
        began = time.perf_counter()
        result = grade_job(runtime, job, builder)
        graded = time.perf_counter() - began
    with tempfile.TemporaryDirectory(prefix="minictr-bench-") as place:
        source, binary = os.path.join(place, "main.c"), os.path.join(place, "main")
        with open(source, "w") as out:
            out.write(C_SOURCE)
        subprocess.run(["gcc", "-O2", "-o", binary, source], check=True)
        began = time.perf_counter()
        for i in range(cases):
            subprocess.run([binary], input=f"{i}\n".encode(), capture_output=True, check=True)
        bare = time.perf_counter() - began
    build = result.compile.wall_time if result.compile and result.compile.wall_time else 0.0
    per_case = (graded - build) / cases
    return {"job_20_cases_s": round(graded, 3), "build_s": round(build, 3),
            "per_case_ms": round(per_case * 1e3, 2), "bare_run_ms": round(bare / cases * 1e3, 2),
            "overhead_per_case_ms": round((per_case - bare / cases) * 1e3, 2),
            "wrong": 0 if result.verdict == "ok" else 1}


if __name__ == "__main__":
    sys.exit(main())
