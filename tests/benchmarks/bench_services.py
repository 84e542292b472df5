"""Services: how long a server takes from `run()` to ready, and what a published port costs.

1. Start to ready, PostgreSQL and Redis (the `postgresql` and `redis` recipes), against the
   same server started bare on this host, with the same arguments, by subprocess.Popen:
     minictr  runtime.run(rootfs, ports=[PORT]) + wait_for_output(READY LINE)
     bare     Popen([the server...]) + reading its output until the same line
   PostgreSQL's time includes initdb (both ways: a fresh cluster each start, in the
   container's layer, a tmpfs, or in a fresh directory under /dev/shm on the host); bare,
   it runs as the Debian package's `postgres` account (PostgreSQL refuses root).
   Runs alternate, after one warm-up each. Target: minictr's median <= 1.10 x bare's.

2. Throughput through a published port, to one Redis server in a container:
     published  a client on the host's loopback -> the published port -> the forwarder ->
                the server, inside
     direct     the same client, in the container's network namespace (setns), straight to
                the same server on its loopback: no forwarder
   Round trips: PING/PONG on one connection, one at a time (latency-bound: each costs the
   forwarder two wakeups). Bulk: GET of a 4 MiB value, again and again (bytes/s). Each
   client runs in a forked child (the same code both ways), a bounded number of requests,
   also stopped after --seconds. Targets: round trips >= 0.7 x direct, bulk >= 0.5 x.

Traffic stays on loopbacks (the host's and the container's). Needs root (setns into the
container's network namespace; `postgres` for the bare server); prints figures and ratios
and exits 0 unless a run failed.

    python tests/benchmarks/bench_services.py [--starts 7] [--seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from pytest_minictr import ContainerRuntime, RootfsBuilder
from pytest_minictr.host import linux
from pytest_minictr.rootfs import recipe as recipes

REDIS_READY = rb"Ready to accept connections"
PG_READY = rb"database system is ready to accept connections"
BULK_VALUE = 4 * 1024 * 1024
MAX_ROUND_TRIPS = 200_000
MAX_BULK_GETS = 5_000
READY_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- 1. start to ready ------------------------------------------------------------------------

def bare_until(argv: list[str], ready: bytes, user: str | None = None) -> tuple[float, object]:
    """Seconds from Popen to the ready line on the server's stdout or stderr; the process."""
    began = time.perf_counter()
    if user is not None:
        account = pwd.getpwnam(user)
        argv = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                "--clear-groups", *argv]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while ready not in seen:
        if not select.select([process.stdout], [], [], max(0, deadline - time.monotonic()))[0]:
            process.kill()
            raise RuntimeError(f"{argv[0]} not ready in {READY_TIMEOUT} s: {seen[-500:]!r}")
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            raise RuntimeError(f"{argv} ended: {seen[-500:]!r}")
        seen += chunk
    return time.perf_counter() - began, process


def stop_bare(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stdout.close()


def minictr_until(runtime: ContainerRuntime, rootfs, port: int, ready: bytes) -> float:
    began = time.perf_counter()
    container = runtime.run(rootfs, ports=[port], memory_limit="512M", timeout=120)
    container.wait_for_output(ready, timeout=READY_TIMEOUT)
    took = time.perf_counter() - began
    container.stop()
    return took


def redis_bare(port: int) -> list[str]:
    command = list(recipes.load("redis").command)
    return [shutil.which("redis-server"), *command[1:command.index("--port") + 1], str(port),
            *command[command.index("--port") + 2:]]


def postgres_bare(data: str, port: int) -> list[str]:
    """The recipe's initdb and postgres, with the same arguments, in `data`."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    return ["sh", "-c", f"TZ=UTC PGTZ=UTC; export TZ PGTZ; {bindir}/initdb -D {data} -U postgres "
            "-A trust -E UTF8 --locale=C --no-sync >/dev/null && exec "
            f"{bindir}/postgres -D {data} -c listen_addresses=127.0.0.1 -c port={port} "
            f"-c unix_socket_directories={data} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c jit=off"]


def start_to_ready(runtime: ContainerRuntime, builder: RootfsBuilder, starts: int) -> dict:
    figures: dict[str, dict[str, list[float]]] = {}
    redis_rootfs = builder.build(recipe="redis")
    pg_rootfs = builder.build(recipe="postgresql")
    for round_number in range(starts + 1):
        times = {}
        times[("redis", "minictr")] = minictr_until(runtime, redis_rootfs, 6379, REDIS_READY)
        took, process = bare_until(redis_bare(free_port()), REDIS_READY)
        stop_bare(process)
        times[("redis", "bare")] = took
        times[("postgresql", "minictr")] = minictr_until(runtime, pg_rootfs, 5432, PG_READY)
        data = tempfile.mkdtemp(prefix="minictr-bench-pg-", dir="/dev/shm")
        os.chown(data, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
        try:
            took, process = bare_until(postgres_bare(data, free_port()), PG_READY, "postgres")
            stop_bare(process)
        finally:
            shutil.rmtree(data, ignore_errors=True)
        times[("postgresql", "bare")] = took
        if round_number:  # the first round warms caches up
            for (server, how), took in times.items():
                figures.setdefault(server, {}).setdefault(how, []).append(took)
    return figures


# --- 2. throughput through a published port ---------------------------------------------------

def redis_command(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def round_trips(address: tuple[str, int], seconds: float) -> float:
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ping = redis_command(b"PING")
        done, began = 0, time.perf_counter()
        deadline = began + seconds
        while done < MAX_ROUND_TRIPS and (done % 256 or time.perf_counter() < deadline):
            sock.sendall(ping)
            if sock.recv(64) != b"+PONG\r\n":
                raise RuntimeError("unexpected answer to PING")
            done += 1
        return done / (time.perf_counter() - began)


def bulk(address: tuple[str, int], seconds: float) -> float:
    with socket.create_connection(address) as sock:
        get = redis_command(b"GET", b"bulk")
        expected = len(b"$%d\r\n" % BULK_VALUE) + BULK_VALUE + 2
        buffer = bytearray(1 << 20)
        moved, gets, began = 0, 0, time.perf_counter()
        while gets < MAX_BULK_GETS and (gets < 3 or time.perf_counter() < began + seconds):
            sock.sendall(get)
            left = expected
            while left:
                got = sock.recv_into(buffer, min(left, len(buffer)))
                if not got:
                    raise RuntimeError("the server closed the connection")
                left -= got
            moved += expected
            gets += 1
        return moved / (time.perf_counter() - began)


def in_child(measure, address, seconds: float, netns_of: int | None) -> float:
    """`measure(address, seconds)` in a forked child, in the network namespace of process
    `netns_of` (None: ours)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if netns_of is not None:
                fd = os.open(f"/proc/{netns_of}/ns/net", os.O_RDONLY)
                linux.setns(fd, linux.CLONE_NEWNET)
            os.write(write_end, json.dumps(measure(address, seconds)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        data = answer.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"{measure.__name__} failed in its child")
    return json.loads(data)


def throughput(runtime: ContainerRuntime, builder: RootfsBuilder, seconds: float,
               rounds: int) -> dict:
    server = runtime.run(builder.build(recipe="redis"), ports=[6379], timeout=600)
    try:
        server.wait_for_port(6379, timeout=READY_TIMEOUT)
        published = server.address(6379)
        with socket.create_connection(published) as sock:
            sock.sendall(redis_command(b"SET", b"bulk", b"x" * BULK_VALUE))
            assert sock.recv(16) == b"+OK\r\n"
        figures: dict[str, dict[str, list[float]]] = {"round trips/s": {}, "bulk bytes/s": {}}
        for _ in range(rounds):
            for name, measure in (("round trips/s", round_trips), ("bulk bytes/s", bulk)):
                for how, address, netns in (("published", published, None),
                                            ("direct", ("127.0.0.1", 6379), server.pid)):
                    figures[name].setdefault(how, []).append(
                        in_child(measure, address, seconds, netns))
        return figures
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_services: needs root (setns into a container's network namespace)")
        return 1
    builder = RootfsBuilder()
    with ContainerRuntime() as runtime:
        starts = start_to_ready(runtime, builder, args.starts)
        moved = throughput(runtime, builder, args.seconds, args.rounds)
    report = {}
    for server, hows in starts.items():
        medians = {how: statistics.median(times) for how, times in hows.items()}
        report[f"{server} start to ready (s)"] = {
            **medians, "minictr/bare": medians["minictr"] / medians["bare"], "target": "<= 1.10"}
    for name, hows in moved.items():
        medians = {how: statistics.median(values) for how, values in hows.items()}
        report[name] = {**medians, "published/direct": medians["published"] / medians["direct"],
                        "target": ">= 0.7" if name.startswith("round") else ">= 0.5"}
    if args.json:
        print(json.dumps(report))
    else:
        for name, figures in report.items():
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in figures.items())
            print(f"{name}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
