"""What each protection of the default confinement costs a container start, step by step.

bench_start.py times whole starts against bwrap (and with user=False / seccomp=False); this
one times the steps themselves: the default container's own setup plan (container.plan), but
its last step, carried out by the project's executor in forked children that are PID 1 of a
new PID namespace, as a spare is, each step timed. The hardening steps:

  proc masks      "mask /proc": /dev/null and empty tmpfs over /proc/kcore etc., and
                  /proc/sys etc. bound read-only
  idmap           "idmap the rootfs": the base seen with container root as its owner
  rlimits         "set rlimits": the defaults
  keyring         "join a new session keyring"
  user namespace  "enter the user namespace": setns + setgroups + setresgid/uid
  capabilities    "drop capabilities": bounding set, no_new_privs, capset, ambient
  seccomp build   seccomp.host_filter() (the BPF program, built once by the launcher)
  seccomp install "install the seccomp filter"

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
from pytest_minictr import RootfsBuilder
from pytest_minictr.container import plan, seccomp
from pytest_minictr.container.executor import Executor
from pytest_minictr.container.init import ChildFds
from pytest_minictr.host import idmap, linux
from pytest_minictr.keywords import make_spec

STEPS = ("proc masks", "idmap", "rlimits", "keyring", "user namespace", "capabilities",
         "seccomp build", "seccomp install")


def timed(times: dict, name: str, function, *args):
    start = time.perf_counter()
    result = function(*args)
    times[name] = (time.perf_counter() - start) * 1e6
    return result


# the plan's step behind each figure
STEP_NAMES = {"mask /proc": "proc masks", "idmap the rootfs": "idmap", "set rlimits": "rlimits",
              "join a new session keyring": "keyring",
              "enter the user namespace": "user namespace",
              "drop capabilities": "capabilities", "install the seccomp filter": "seccomp install"}


def one_start(steps: tuple[plan.Step, ...]) -> dict:
    """In a child, PID 1 of a new PID namespace: the plan's steps, the hardening ones timed;
    the times as a dict."""
    read, write = os.pipe()
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY)
    own_pidfd = os.pidfd_open(os.getpid())
    pid = linux.fork_into_new_pid_namespace(own_pid_namespace)
    if pid == 0:
        try:
            os.close(read)
            times: dict = {}
            stdio = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
            executor = Executor(fds=ChildFds(*stdio, write, write), signal_proxy=None,
                                **{"parent pidfd": own_pidfd})
            for step in steps:
                if step.name in STEP_NAMES:
                    timed(times, STEP_NAMES[step.name], executor.carry_out, step)
                else:
                    executor.carry_out(step)
            timed(times, "seccomp build", seccomp.host_filter)
            os.write(write, json.dumps(times).encode())
        except BaseException as error:  # noqa: BLE001 - say it, or the parent sees nothing
            print(f"bench_hardening: {error!r}", file=sys.stderr)
        finally:
            os._exit(0)
    for fd in (write, own_pid_namespace, own_pidfd):
        os.close(fd)
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
        # a rootfs of the builder's own, not the cache's shifted one: the idmap step runs
        os.chown(rootfs, 0, 0)
        where = plan.Where(userns_fd=userns.fd, host_ids=(userns.host_uid, userns.host_gid))
        steps = plan.setup_plan(make_spec(rootfs, ["true"]), where)[:-1]
        samples = [one_start(steps) for _ in range(args.runs)]
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
