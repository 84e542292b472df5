"""Container start latency: minictr against bwrap and unshare, seen from a big caller.

What it measures: the wall time, taken by the caller around the whole call, to run `echo hi`
in a fresh container and get its output back:

  minictr  ContainerRuntime.run(rootfs, ["echo", "hi"]).wait(), one runtime reused
  minictr+limits  the same with memory_limit="64M", pids_limit=64 (a cgroup of its own)
  minictr-userns  the same with user=False: container root is host root (what the default user
                  namespace and idmapped base cost, against minictr)
  minictr-userns-seccomp  user=False, seccomp=False (what the seccomp filter costs, against
                  minictr-userns)
  bwrap    subprocess.run(["bwrap", "--unshare-all", --ro-bind rootfs /, /proc, /dev, /tmp ...])
  unshare  subprocess.run(["unshare", pid+fork, mount, uts, ipc, net, --mount-proc,
                           "chroot", rootfs, ...])   (util-linux; a floor more than a peer:
                           no overlay, /dev or /tmp, and its new /proc is mounted on the
                           host's /proc path, outside the chroot)

Before measuring, this process grows to about --caller-mb MiB of touched memory, like a pytest
run with plugins loaded: whatever forks from a big caller pays for its size (page tables to
copy), and minictr, whose launcher is a separate small process, must not. (subprocess uses
vfork() where it can since Python 3.10, so bwrap and unshare do not pay either.) Runs are
interleaved round-robin, the order rotating each round, after a few warm-up rounds, so
machine noise falls on all peers alike.

How to read it: compare medians (p95 shows the tail, min the floor without noise). The ratio
line is minictr's median over each peer's: below 1 means minictr starts faster. A last
measurement runs minictr+limits back to back, with no peer in between (a grader's loop). The script
reports and does not judge: it exits 0 when every run worked, 1 if any failed (shown).

Then what a start costs in CPU, which decides how many fit on a busy machine (pytest-xdist
workers, a grader's parallel jobs) more than its latency does: minictr and bwrap each run back
to back, the machine's busy time (/proc/stat: every process and kernel thread, cleanup after
the run included) over the runs. minictr's is split: this caller, the launcher, the zygote, and
the rest (the container's init and command, and kernel threads).

    python tests/benchmarks/bench_start.py [--runs 300] [--warmup 5] [--caller-mb 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench_plugin import busy_cpu_s

from pytest_minictr import ContainerRuntime, RootfsBuilder

PAGE = os.sysconf("SC_PAGESIZE")
LIMITS = {"memory_limit": "64M", "pids_limit": 64}
VARIANTS = {"minictr": {}, "minictr+limits": LIMITS, "minictr-userns": {"user": False},
            "minictr-userns-seccomp": {"user": False, "seccomp": False}}
EXPECTED = b"hi\n"
_ballast: list = []  # kept alive for the whole run


def grow_caller(mib: int) -> None:
    """Touch `mib` MiB: 90% one bytearray written page by page, 10% small Python objects."""
    if mib <= 0:
        return
    block = bytearray(mib * 9 // 10 * 2**20)
    for offset in range(0, len(block), PAGE):
        block[offset] = 1
    objects = [{"n": i, "s": str(i)} for i in range(mib * 2**20 // 10 // 300)]
    _ballast.extend([block, objects])


def caller_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def check(returncode: int, stdout: bytes, stderr: bytes) -> None:
    if returncode != 0 or stdout != EXPECTED:
        raise RuntimeError(f"exit {returncode}, stdout {stdout!r} (want {EXPECTED!r}), "
                           f"stderr {stderr[-300:]!r}")


def subprocess_peer(argv: list[str]):
    def run() -> None:
        done = subprocess.run(argv, capture_output=True)
        check(done.returncode, done.stdout, done.stderr)
    return run


def minictr_peer(runtime: ContainerRuntime, rootfs: str, keywords: dict):
    def run() -> None:
        result = runtime.run(rootfs, ["echo", "hi"], **keywords).wait()
        check(result.returncode, result.stdout, result.stderr)
    return run


def make_peers(runtime: ContainerRuntime, rootfs: str) -> tuple[dict, dict]:
    """The peers to time ({name: callable}) and what each one runs, or why it is skipped."""
    commands = {
        name: f"ContainerRuntime().run(rootfs, ['echo', 'hi'], **{keywords}).wait()"
        for name, keywords in VARIANTS.items()}
    commands.update({
        "bwrap": ["bwrap", "--unshare-all", "--ro-bind", rootfs, "/", "--proc", "/proc",
                  "--dev", "/dev", "--tmpfs", "/tmp", "echo", "hi"],
        "unshare": ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net",
                    "--mount-proc", "chroot", rootfs, "echo", "hi"],
    })
    peers = {name: minictr_peer(runtime, rootfs, keywords)
             for name, keywords in VARIANTS.items()}
    described = {name: commands[name] for name in peers}
    for name in ("bwrap", "unshare"):
        if shutil.which(name) is None:
            described[name] = f"{name} not installed"
        else:
            peers[name] = subprocess_peer(commands[name])
            described[name] = " ".join(commands[name])
    return peers, described


def measure(peers: dict, runs: int, warmup: int) -> tuple[dict, dict]:
    times: dict[str, list[float]] = {name: [] for name in peers}
    failures: dict[str, list[str]] = {name: [] for name in peers}
    names = list(peers)
    for round_ in range(warmup + runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            try:
                peers[name]()
            except Exception as error:  # noqa: BLE001 - reported, not raised
                failures[name].append(f"{type(error).__name__}: {error}")
                continue
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times, failures


def summarize(samples: list[float]) -> dict:
    if not samples:
        return {"runs": 0, "median_ms": None, "p95_ms": None, "min_ms": None}
    ordered = sorted(samples)
    return {"runs": len(ordered), "median_ms": statistics.median(ordered),
            "p95_ms": ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)],
            "min_ms": ordered[0]}


def ratios(stats: dict, described: dict) -> dict:
    out = {}
    for ours in VARIANTS:
        mine = stats[ours]["median_ms"]
        for name in ("bwrap", "unshare"):
            theirs = stats.get(name, {}).get("median_ms")
            out[f"{ours}/{name}"] = (round(mine / theirs, 3) if mine and theirs
                                     else described[name] if name not in stats else None)
    return out


def measure_back_to_back(runtime: ContainerRuntime, rootfs: str, runs: int) -> dict:
    """Containers started one right after the other (a grader's loop): the spare inits the
    launcher prepares while idle have less time to get ready than between interleaved peers."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = runtime.run(rootfs, ["echo", "hi"], **LIMITS).wait()
        times.append((time.perf_counter() - start) * 1000)
        check(result.returncode, result.stdout, result.stderr)
    return summarize(times)


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> set[int]:
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
        except OSError:
            pass  # gone meanwhile
    return found


def measure_cpu(start, runs: int) -> dict:
    """ms of CPU per run: the machine's, ours, and our launcher's and zygote's (our child,
    and its child that outlives the runs), if any."""
    start()  # the launcher and its zygote exist from here on
    launchers = children(os.getpid())
    # the launcher's children: its zygote, and spares, which a start may take meanwhile
    helpers = {}
    for pid in launchers | {pid for launcher in launchers for pid in children(launcher)}:
        try:
            helpers[pid] = process_cpu_s(pid)
        except OSError:
            pass  # a spare, gone into a container since it was listed
    kept = set(helpers) - launchers
    machine, own = busy_cpu_s(), time.process_time()
    for _ in range(runs):
        start()
    per_run = {"machine": busy_cpu_s() - machine, "caller": time.process_time() - own}
    zygotes = kept & {pid for launcher in launchers for pid in children(launcher)}
    if launchers:
        per_run["launcher"] = sum(process_cpu_s(pid) - helpers[pid] for pid in launchers)
        per_run["zygote"] = sum(process_cpu_s(pid) - helpers[pid] for pid in zygotes)
        per_run["rest"] = per_run["machine"] - sum(
            per_run[key] for key in ("caller", "launcher", "zygote"))
    return {key: value * 1000 / runs for key, value in per_run.items()}


def print_table(report: dict) -> None:
    print(f"kernel {report['kernel']}, {report['cpus']} CPUs, python {report['python']}, "
          f"caller VmRSS {report['caller_rss_kib'] / 1024:.0f} MiB, "
          f"{report['runs']} runs per peer (+{report['warmup']} warm-up), interleaved")
    print(f"\n{'peer':<23}{'median ms':>11}{'p95 ms':>10}{'min ms':>10}{'runs':>7}{'failed':>8}")
    for name, row in report["peers"].items():
        cells = [f"{row[k]:>10.2f}" if row[k] is not None else f"{'-':>10}"
                 for k in ("median_ms", "p95_ms", "min_ms")]
        print(f"{name:<23} {cells[0]}{cells[1]}{cells[2]}{row['runs']:>7}{row['failed']:>8}")
    loop = report["back_to_back_limits"]
    print(f"\nminictr+limits back to back (not interleaved): median {loop['median_ms']:.2f} ms, "
          f"p95 {loop['p95_ms']:.2f} ms")
    print("\nCPU per start, back to back (ms; machine: every process and kernel thread):")
    for name, row in report["cpu_per_start"].items():
        split = ", ".join(f"{key} {row[key]:.2f}" for key in ("caller", "launcher", "zygote",
                                                             "rest") if key in row)
        print(f"  {name:<8} machine {row['machine']:.2f}" + (f" ({split})" if split else ""))
    print()
    for key, value in report["ratios"].items():
        shown = f"{value:.2f}" if isinstance(value, float) else (value or "n/a")
        print(f"median ratio {key}: {shown}")
    print("\ncommands:")
    for name, command in report["commands"].items():
        print(f"  {name}: {command}")
    for name, messages in report["failures"].items():
        for message in messages[:3]:
            print(f"FAILED {name}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--caller-mb", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    grow_caller(args.caller_mb)
    with tempfile.TemporaryDirectory(prefix="minictr-bench-") as cache:
        os.environ.setdefault("MINICTR_CACHE_DIR", cache)
        rootfs = str(RootfsBuilder().build(binaries=["sh", "echo", "cat"]))
        with ContainerRuntime() as runtime:
            peers, described = make_peers(runtime, rootfs)
            times, failures = measure(peers, args.runs, args.warmup)
            back_to_back = measure_back_to_back(runtime, rootfs, args.runs)
        cpu = {}
        with ContainerRuntime() as fresh:  # a launcher of its own, to find and measure
            cpu["minictr"] = measure_cpu(minictr_peer(fresh, rootfs, {}), args.runs)
        if "bwrap" in peers:
            cpu["bwrap"] = measure_cpu(peers["bwrap"], args.runs)

    stats = {name: {**summarize(times[name]), "failed": len(failures[name])} for name in peers}
    report = {"kernel": os.uname().release, "cpus": os.cpu_count(),
              "python": sys.version.split()[0], "caller_rss_kib": caller_rss_kib(),
              "runs": args.runs, "warmup": args.warmup, "peers": stats,
              "ratios": ratios(stats, described), "commands": described,
              "back_to_back_limits": back_to_back, "cpu_per_start": cpu,
              "failures": {name: f for name, f in failures.items() if f}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
