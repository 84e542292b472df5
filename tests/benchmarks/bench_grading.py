"""Grading throughput: trivial Python snippets in the python3 recipe, with limits, against
bwrap running the same snippet on the same rootfs.

  minictr      ContainerRuntime.run(python3 rootfs, ["python3", "-c", SNIPPET], memory 64M,
               pids 32, timeout 10, output 1M, layer 16M).wait(), one runtime per worker
  bwrap        bwrap --unshare-{pid,net,ipc,uts,cgroup} --die-with-parent --ro-bind ROOTFS /
               --proc /proc --dev /dev --tmpfs /tmp python3 -c SNIPPET  (no limits, no user
               namespace, no seccomp: bwrap as root, as lightly as it goes)

Each is run sequentially (1 worker) and by 2 worker processes at once; the figure is snippets
per second over the whole batch (worker start-up excluded: each worker warms up first), and
every verdict is checked. The script reports and does not judge: it exits 1 only if a
snippet went wrong.

    python tests/benchmarks/bench_grading.py [--snippets 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from pytest_minictr import ContainerRuntime, RootfsBuilder

SNIPPET = "print(sum(range(100)))"
EXPECTED = b"4950\n"
LIMITS = {"memory_limit": "64M", "pids_limit": 32, "timeout": 10, "output_limit": "1M",
          "layer_size": "16M"}
WARMUP = 5


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


def bwrap_worker(rootfs: str, count: int, start, results) -> None:
    # no user namespace: the cache is owned by minictr's mapped range (see idmap), which one
    # of bwrap's own would not map; as root bwrap needs none
    argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup", "--die-with-parent", "--ro-bind", rootfs, "/",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "python3", "-c", SNIPPET]
    for _ in range(WARMUP):
        subprocess.run(argv, capture_output=True)
    start.wait()
    bad = 0
    for _ in range(count):
        done = subprocess.run(argv, capture_output=True)
        bad += done.returncode != 0 or done.stdout != EXPECTED
    results.put((time.monotonic(), bad))


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
        for workers in (1, 2):
            for name, worker in peers.items():
                report["runs"][f"{name} x{workers}"] = measure(worker, rootfs, args.snippets,
                                                                workers)
    runs = report["runs"]
    for workers in (1, 2):
        if f"bwrap x{workers}" in runs:
            report[f"ratio x{workers} (minictr/bwrap, snippets/s)"] = round(
                runs[f"minictr x{workers}"]["per_second"]
                / runs[f"bwrap x{workers}"]["per_second"], 2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"python3 recipe: cold build {report['rootfs_cold_s']} s, cached "
              f"{report['rootfs_cached_ms']} ms; snippet {SNIPPET!r}, limits {LIMITS}")
        for name, row in runs.items():
            print(f"{name:<12} {row['per_second']:>7.1f} snippets/s  ({row['snippets']} in "
                  f"{row['seconds']} s, {row['wrong']} wrong)")
        for key, value in report.items():
            if key.startswith("ratio"):
                print(f"{key}: {value}")
    return 1 if any(row["wrong"] for row in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
