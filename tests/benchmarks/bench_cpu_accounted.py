"""CPU a container start costs, counted per process: minictr (native core, and the pure-Python
path with MINICTR_NATIVE=0) against bwrap, in the same run.

bench_start.py takes the machine's busy time (/proc/stat), which is the right figure on a quiet
machine (it includes kernel threads cleaning up after a container) and a useless one beside a
busy neighbour. This one adds up what the kernel charged to our own processes: the caller, the
launcher and what it reaped (spare inits, keepers, exec helpers, and the commands they reaped),
the zygote; and, for bwrap, the caller and what it reaped (bwrap and its command). Kernel
threads are left out on both sides, so it holds on a shared machine too.

    python tests/benchmarks/bench_cpu_accounted.py [--runs 200] [--parts]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pytest_minictr import ContainerRuntime, RootfsBuilder

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int, children: bool) -> float:
    """utime + stime (and cutime + cstime: what it reaped), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    used = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children
                                                 else 0)
    return used / TICK


def launcher_and_zygote() -> tuple[list[int], list[int]]:
    """Our launchers, and their children alive now (the zygote; spares come and go)."""
    ours = str(os.getpid())
    launchers = [pid for pid in os.listdir("/proc") if pid.isdigit()
                 and _parent(pid) == ours and b"launcher.server" in _cmdline(pid)]
    zygotes = [pid for pid in os.listdir("/proc") if pid.isdigit()
               and _parent(pid) in launchers]
    return [int(pid) for pid in launchers], [int(pid) for pid in zygotes]


def _parent(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except OSError:
        return ""


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def measure_minictr(rootfs, runs: int, switch: str, **keywords) -> float:
    """ms of CPU per start: caller, launcher (and all it reaped), zygote; `keywords` for
    run() (the variants that show what a part of the setup costs)."""
    os.environ["MINICTR_NATIVE"] = switch
    with ContainerRuntime() as runtime:
        for _ in range(5):
            runtime.run(rootfs, ["echo", "hi"], **keywords).wait()
        launchers, zygotes = launcher_and_zygote()
        before = (process_cpu_s(os.getpid(), False)
                  + sum(process_cpu_s(pid, True) for pid in launchers)
                  + sum(process_cpu_s(pid, False) for pid in zygotes))
        for _ in range(runs):
            runtime.run(rootfs, ["echo", "hi"], **keywords).wait()
        after = (process_cpu_s(os.getpid(), False)
                 + sum(process_cpu_s(pid, True) for pid in launchers)
                 + sum(process_cpu_s(pid, False) for pid in zygotes))
    return (after - before) * 1000 / runs


def measure_bwrap(rootfs, runs: int) -> float:
    command = ["bwrap", "--unshare-all", "--ro-bind", str(rootfs), "/", "--proc", "/proc",
               "--dev", "/dev", "--tmpfs", "/tmp", "echo", "hi"]
    before = process_cpu_s(os.getpid(), True)
    for _ in range(runs):
        subprocess.run(command, capture_output=True, check=True)
    return (process_cpu_s(os.getpid(), True) - before) * 1000 / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--parts", action="store_true",
                        help="also the native core without the user namespace, "
                             "and without seccomp")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="minictr-bench-")
    try:
        rootfs = RootfsBuilder(cache_dir=cache).build(binaries=["echo"])
        figures = {"minictr native": measure_minictr(rootfs, args.runs, "1"),
                   "minictr python": measure_minictr(rootfs, args.runs, "0")}
        if args.parts:
            # what the user namespace (with its idmapped base), then seccomp, cost on top of
            # the rest: each variant drops one more
            figures["native user=False"] = measure_minictr(rootfs, args.runs, "1", user=False)
            figures["  and seccomp=False"] = measure_minictr(rootfs, args.runs, "1", user=False,
                                                             seccomp=False)
        if shutil.which("bwrap"):
            figures["bwrap"] = measure_bwrap(rootfs, args.runs)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"CPU per start, counted per process ({args.runs} runs each, ms):")
    for name, value in figures.items():
        print(f"  {name:20} {value:6.2f}")
    if "bwrap" in figures:
        for name in ("minictr native", "minictr python"):
            print(f"ratio {name}/bwrap: {figures[name] / figures['bwrap']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
