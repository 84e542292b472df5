"""What each protection of the default confinement costs a container start, step by step.

bench_start.py times whole starts against bwrap (and with user=False / seccomp=False); this
one times the steps themselves, with the project's own functions, in forked children that do
what a container's init does (a new mount namespace, the stage, the overlay, /proc and /dev),
so the figures add up to the start-up cost of the hardening:

  proc masks      mounts.mask_proc(): /dev/null and empty tmpfs over /proc/kcore etc., and
                  /proc/sys etc. bound read-only
  idmap           linux.open_idmapped_tree(): the base seen with container root as its owner
  rlimits         security.set_rlimits() of the defaults
  keyring         a new session keyring
  user namespace  security.enter_user_namespace(): setns + setgroups + setresgid/uid
  capabilities    security.drop_capabilities(): bounding set, no_new_privs, capset, ambient
  seccomp build   seccomp.host_filter() (the BPF program, built once by the launcher)
  seccomp install linux.install_seccomp_filter()

Needs root. Prints the median and p95 of each step in microseconds over --runs children.

    python tests/benchmarks/bench_hardening.py [--runs 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from pytest_minictr import RootfsBuilder  # noqa: E402
from pytest_minictr.container import mounts, seccomp, security
from pytest_minictr.host import idmap, linux
from pytest_minictr.spec import make_spec  # noqa: E402

STEPS = ("proc masks", "idmap", "rlimits", "keyring", "user namespace", "capabilities",
         "seccomp build", "seccomp install")


def timed(times: dict, name: str, function, *args):
    start = time.perf_counter()
    result = function(*args)
    times[name] = (time.perf_counter() - start) * 1e6
    return result


def one_start(rootfs: str, userns: idmap.UserNamespace) -> dict:
    """In a child: the init's setup, timing the hardening steps; the times as a dict."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            times: dict = {}
            linux.unshare(linux.CLONE_NEWNS)
            host_paths = mounts.HostPaths.open(make_spec(rootfs, ["true"]))
            mounts.prepare_stage()
            lower = timed(times, "idmap", linux.open_idmapped_tree, host_paths.rootfs, userns.fd)
            os.close(lower)
            mounts.mount_overlay(host_paths.rootfs, None, None, False)
            mounts.mount_proc()
            mounts.mount_dev()
            timed(times, "proc masks", mounts.mask_proc)
            timed(times, "rlimits", security.set_rlimits, dict(security.DEFAULT_RLIMITS))
            timed(times, "keyring", linux.join_new_session_keyring)
            timed(times, "user namespace", security.enter_user_namespace, userns.fd)
            kept = sum(1 << security.capability_number(name)
                       for name in security.DEFAULT_CAPABILITIES)
            timed(times, "capabilities", security.drop_capabilities, kept)
            program = timed(times, "seccomp build", seccomp.host_filter)
            timed(times, "seccomp install", linux.install_seccomp_filter, program)
            os.write(write, json.dumps(times).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as results:
        data = results.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_hardening: needs root (it mounts and enters namespaces)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="minictr-bench-") as cache:
        rootfs = str(RootfsBuilder(cache_dir=cache).build(binaries=["true"]))
        userns = idmap.make_user_namespace()
        seccomp.host_filter()  # as the launcher does
        samples = [one_start(rootfs, userns) for _ in range(args.runs)]
    report = {}
    for step in STEPS:
        values = sorted(sample[step] for sample in samples)
        report[step] = {"median_us": round(statistics.median(values), 1),
                        "p95_us": round(values[int(0.95 * (len(values) - 1))], 1)}
    total = sum(row["median_us"] for row in report.values())
    if args.json:
        print(json.dumps({"steps": report, "total_median_us": round(total, 1)}, indent=2))
        return 0
    print(f"kernel {os.uname().release}, {args.runs} runs; microseconds per container start")
    print(f"\n{'step':<18}{'median':>9}{'p95':>9}")
    for step, row in report.items():
        print(f"{step:<18}{row['median_us']:>9.1f}{row['p95_us']:>9.1f}")
    print(f"{'total (medians)':<18}{total:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
