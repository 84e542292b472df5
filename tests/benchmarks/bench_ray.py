"""Grading on Ray against the local batch, on this machine, in the same run:

  local   Grader(workers=3): three worker processes, each with a warm runtime
  ray     Grader(ray=ADDRESS): a ray.cluster_utils.Cluster of three nodes of one CPU each,
          all on loopback; each job a Ray task in a worker with a warm runtime

The same trivial python3 jobs (one case each) go through both, after a warm-up batch (the
workers' start and the rootfs cache are not counted). The figure is the wall time of the batch
and Ray's overhead per job: (ray - local) / jobs. Every verdict must be `ok`; the script exits
1 otherwise. Needs `pip install 'pytest-minictr[ray]'`.

    python tests/benchmarks/bench_ray.py [--jobs 120] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only; read at Ray's import
from pytest_minictr.grading import Case, Grader, Job

NODES = 3
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "memory": 1 << 30,
        "object_store_memory": 80 << 20}


def jobs(count: int, tag: str) -> list[Job]:
    return [Job(id=f"{tag}-{index}", language="python3",
                files=(("main.py", "print(sum(range(int(input()))))\n"),),
                cases=(Case(id="c1", stdin="100\n", expected_stdout="4950\n"),))
            for index in range(count)]


def timed(grader: Grader, count: int, tag: str) -> tuple[float, bool]:
    grader.map(jobs(2 * NODES, f"{tag}-warm"))
    started = time.perf_counter()
    results = grader.map(jobs(count, tag))
    return time.perf_counter() - started, all(r.verdict == "ok" for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # Ray's logs, sockets and address file in a directory of ours, removed at the end
    place = tempfile.mkdtemp(prefix="ray-")
    os.makedirs(os.path.join(place, "ray"))
    os.environ["RAY_TMPDIR"] = place
    import ray
    from ray.cluster_utils import Cluster
    with Grader(workers=NODES) as grader:
        local, local_ok = timed(grader, args.jobs, "local")
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        for _ in range(NODES - 1):
            cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        with Grader(ray=cluster.address) as grader:
            on_ray, ray_ok = timed(grader, args.jobs, "ray")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(place, ignore_errors=True)
    report = {"jobs": args.jobs, "workers": NODES, "local_seconds": local,
              "ray_seconds": on_ray, "overhead_ms_per_job": (on_ray - local) / args.jobs * 1e3,
              "all ok": local_ok and ray_ok}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"local  {local:6.2f} s  ({args.jobs / local:5.1f} jobs/s)  3 workers")
        print(f"ray    {on_ray:6.2f} s  ({args.jobs / on_ray:5.1f} jobs/s)  3 nodes of 1 CPU")
        print(f"Ray's overhead: {report['overhead_ms_per_job']:+.1f} ms a job"
              + ("" if report["all ok"] else "   (some job was not ok!)"))
    return 0 if report["all ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
