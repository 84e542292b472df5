"""Soak: thousands of container runs of every kind from one process (or several), then an
account of everything a run could leave behind, taken on the real host.

Each worker (a process with its own ContainerRuntime) cycles through: success, failure exit,
timeout, output flood (truncated), stop() mid-run, exec into a running container, and every
100th run an OOM kill; each outcome is checked. Before (after a warm-up) and after, it counts:
the host's mount points, its launcher's cgroups, temp dirs, open fds of the caller and of the
launcher, zombies and leftover processes, and the RSS of caller and launcher. Any difference
(or a wrong outcome) is a failure: exit 1. RSS is reported, start and end.

    python tests/benchmarks/soak.py                      # the full soak: 10,000 runs
    python tests/benchmarks/soak.py --runs 2000 --workers 2
    python tests/benchmarks/soak.py --runs 300 --json    # the short mode CI runs (test_soak)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from pytest_minictr import ContainerRuntime, RootfsBuilder

# The timeout ends the flood; under load (a CI running tests beside us) `yes` may start late
# or be scheduled seldom: it has that long to fill the limit.
FLOOD = {"output_limit": 65536, "timeout": 0.2}
HOG = ["sh", "-c", 'a=x; while :; do a="$a$a"; done']


def check(result, kind: str) -> str | None:
    """What is wrong with `result` for a run of `kind`, or None."""
    expected = {"ok": result.returncode == 0 and result.stdout == b"hi\n",
                "fail": result.returncode == 3,
                "timeout": result.timed_out and result.returncode == -9,
                # the limit reached, exactly; truncated unless we read nothing of it until the
                # timeout ended `yes` (the pipe then held just the limit: 64 KiB)
                "flood": len(result.stdout) == 65536
                and (result.output_truncated or result.timed_out),
                "stop": result.returncode == -9,
                "exec": result.returncode == 0,
                "oom": result.oom_killed is not False and result.returncode == -9}[kind]
    return None if expected else f"{kind}: {result}"


def one_run(runtime: ContainerRuntime, rootfs: str, number: int) -> str | None:
    if number % 100 == 99:
        return check(runtime.run(rootfs, HOG, memory_limit="16M", timeout=30).wait(), "oom")
    kind = ("ok", "ok", "ok", "ok", "fail", "fail", "timeout", "flood", "stop",
            "exec")[number % 10]
    if kind == "ok":
        return check(runtime.run(rootfs, ["echo", "hi"]).wait(), kind)
    if kind == "fail":
        return check(runtime.run(rootfs, ["sh", "-c", "exit 3"]).wait(), kind)
    if kind == "timeout":
        return check(runtime.run(rootfs, ["sleep", "10"], timeout=0.05).wait(), kind)
    if kind == "flood":
        return check(runtime.run(rootfs, ["yes"], **FLOOD).wait(), kind)
    container = runtime.run(rootfs, ["sleep", "10"])
    if kind == "exec":
        wrong = check(container.exec(["true"]), kind)
        container.kill()
        return wrong
    return check(container.stop(grace=0), kind)


def accounting(launcher: int, cache: str) -> dict:
    """What a run could leave behind, as the host shows it now."""
    me = os.getpid()
    children = _children(me)
    launcher_fds = Path(f"/proc/{launcher}/fd")
    return {
        "mounts": sorted(line.split()[4] for line in
                         Path("/proc/self/mountinfo").read_text().splitlines()),
        "cgroups": launcher_cgroups(launcher),
        "temp dirs": sorted(str(p) for p in [*Path(cache).glob(".tmp-*"),
                                             *Path("/dev/shm").glob(f"minictr-layer-{me}-*")]),
        "caller fds": len(os.listdir("/proc/self/fd")),
        "launcher fds": len(os.listdir(launcher_fds)) if launcher_fds.exists() else None,
        "zombies": sorted(pid for pid in children if _state(pid) == "Z"),
    }


def launcher_cgroups(launcher: int) -> list[str]:
    """The groups named after our launcher, in any hierarchy (under a `minictr` parent)."""
    prefix = f"minictr-{launcher}@"
    return sorted(os.path.join(directory, name)
                  for directory, subdirs, _ in os.walk("/sys/fs/cgroup")
                  if os.path.basename(directory) == "minictr"
                  for name in subdirs if name.startswith(prefix))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path("/proc").glob("[0-9]*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(task.name))
    return found


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2:].split()[0]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def soak(rootfs: str, runs: int, cache: str) -> dict:
    """One worker's soak; its report."""
    wrong: list[str] = []
    runtime = ContainerRuntime()
    for number in range(20):  # warm-up: the launcher, its spares, caches, imports
        one_run(runtime, rootfs, number)
    launcher = runtime._client.pid
    time.sleep(0.5)  # the launcher idle, its spare inits made: the state `after` compares to
    before = accounting(launcher, cache)
    rss = {"caller_start_kib": rss_kib(os.getpid()), "launcher_start_kib": rss_kib(launcher)}
    started = time.monotonic()
    for number in range(runs):
        problem = one_run(runtime, rootfs, number)
        if problem:
            wrong.append(problem)
    seconds = time.monotonic() - started
    time.sleep(0.5)  # the last container's teardown (its cgroup goes after its end event)
    during = accounting(launcher, cache)
    rss.update(caller_end_kib=rss_kib(os.getpid()), launcher_end_kib=rss_kib(launcher))
    runtime.close()
    after = accounting(launcher, cache)
    leaks = {key: {"before": before[key], "after": during[key]}
             for key in before if before[key] != during[key] and key != "cgroups"}
    if after["cgroups"]:
        leaks["cgroups"] = after["cgroups"]
    leftover = [pid for pid in _children(os.getpid()) if _state(pid) != "gone"]
    if leftover:
        leaks["processes"] = leftover
    return {"runs": runs, "seconds": round(seconds, 2), "wrong": wrong[:10],
            "wrong_count": len(wrong), "leaks": leaks, **rss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10000, help="runs per worker")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="minictr-soak-") as cache:
        rootfs = str(RootfsBuilder(cache_dir=cache).build(
            binaries=["sh", "echo", "sleep", "yes", "true"]))
        if args.workers == 1:
            reports = [soak(rootfs, args.runs, cache)]
        else:
            # A pool, not Processes feeding a Queue: a worker that dies at once (as on a host
            # where containers cannot run) must end the soak with its error, while a parent
            # reading a Queue, whose pipe's write end it holds too, would wait forever.
            with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
                futures = [pool.submit(soak, rootfs, args.runs, cache)
                           for _ in range(args.workers)]
                reports = [future.result() for future in futures]
    failed = any(r["wrong_count"] or r["leaks"] for r in reports)
    if args.json:
        print(json.dumps({"workers": reports, "failed": failed}, indent=2))
    else:
        for number, report in enumerate(reports):
            print(f"worker {number}: {report['runs']} runs in {report['seconds']} s, "
                  f"{report['wrong_count']} wrong, leaks: {report['leaks'] or 'none'}; "
                  f"RSS caller {report['caller_start_kib']} -> {report['caller_end_kib']} KiB,"
                  f" launcher {report['launcher_start_kib']} -> {report['launcher_end_kib']} KiB")
            for problem in report["wrong"]:
                print(f"  WRONG {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
