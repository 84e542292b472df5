"""Grading on Ray: jobs as Ray tasks on a cluster of three nodes on this machine
(`ray.cluster_utils.Cluster`, every node bound to loopback), the job's memory limit as the
task's `memory` resource, a node removed mid-batch costing nothing, a job out of retries an
`infra_error`; and without Ray, an error that says how to install it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pytest_minictr import ConfigError
from pytest_minictr.grading import Grader
from pytest_minictr.grading.jobs import Case, Job, Limits
from pytest_minictr.grading.ray_backend import INSTALL_HINT, RayBackend, import_ray

MiB = 1024 ** 2
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "memory": 1024 * MiB,
        "object_store_memory": 80 * MiB}
# Ray binds the host's own interface too unless this is set (before it starts): the tests send
# nothing beyond loopback.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def job(job_id: str, seconds: float = 0.0, memory: int = 64 * MiB) -> Job:
    program = f"import time\ntime.sleep({seconds})\nprint(input()[::-1])\n"
    return Job(id=job_id, language="python3", files=(("main.py", program),),
               cases=(Case(id="c1", stdin=f"{job_id}\n", expected_stdout=f"{job_id[::-1]}\n"),),
               limits=Limits(memory=memory, timeout=30.0))


@pytest.fixture(scope="module")
def ray():
    if os.geteuid() != 0:
        pytest.skip("grading needs cgroup limits: root, or a delegated cgroup v2")
    # Ray reads it once, at its import: set later, the driver would look for the cluster on
    # the host's own address (and wait for it for ever)
    os.environ.update(LOOPBACK_ONLY)
    ray = pytest.importorskip("ray", reason="Ray is not installed (the ray tox env has it: "
                                            f"{INSTALL_HINT})")
    from ray._private import ray_constants
    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before the test set " \
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    return ray


@pytest.fixture(scope="module")
def node():
    """A node's arguments: its logs and sockets in a directory of the test's own (Ray also
    writes the cluster's address under RAY_TMPDIR, whatever the node's temp_dir). A short
    one: Ray's socket paths under pytest's (and xdist's) directories would pass the 108 bytes
    a Unix socket's path may have."""
    place = tempfile.mkdtemp(prefix="ray-")
    os.makedirs(os.path.join(place, "ray"))
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = place
    yield {**NODE, "temp_dir": os.path.join(place, "ray")}
    if saved is None:
        del os.environ["RAY_TMPDIR"]
    else:
        os.environ["RAY_TMPDIR"] = saved
    shutil.rmtree(place, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray, node):
    from ray.cluster_utils import Cluster
    before = descendants()
    nodes = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(2):
            nodes.add_node(**node)
        ray.init(address=nodes.address, log_to_driver=False)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        started = descendants() - before
        ray.shutdown()
        nodes.shutdown()
        assert_gone(started)


def descendants(root: int | None = None) -> set[int]:
    """Every process below `root` (default: this one): the cluster's, its workers', their
    launchers'."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [os.getpid() if root is None else root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def ray_workers(raylet: int) -> dict[int, bytes]:
    """The worker processes of a node, with their titles: `default_worker.py` while they
    start, then `ray::TASK` or `ray::IDLE` (Ray renames them)."""
    workers = {}
    for pid in descendants(raylet):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"default_worker.py" in title or (title.startswith(b"ray::")
                                             and b"Agent" not in title):
            workers[pid] = title
    return workers


def assert_gone(pids: set[int], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while (alive := {pid for pid in pids if Path(f"/proc/{pid}").exists()}) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"left running after the cluster's shutdown: {sorted(alive)}"


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'pytest-minictr\[ray\]'"):
        import_ray()
    with pytest.raises(ConfigError, match=r"pip install 'pytest-minictr\[ray\]'"):
        Grader(ray="auto")


def test_ray_is_imported_only_when_asked_for():
    code = ("import sys, pytest_minictr.grading, pytest_minictr.grading.ray_backend\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_jobs_come_back_graded_from_the_cluster(cluster):
    backend = RayBackend(cluster.address)
    jobs = [job(f"job-{index}") for index in range(9)]
    results = backend.map(jobs)
    assert [(r.id, r.verdict) for r in results] == [(j.id, "ok") for j in jobs]
    assert sorted(r.id for r in backend.imap_unordered(jobs[:3])) == ["job-0", "job-1", "job-2"]


def test_the_grader_and_the_cli_take_a_ray_address(cluster, tmp_path):
    jobs = [job("g1"), job("g2")]
    with Grader(ray=cluster.address) as grader:
        assert [(r.id, r.verdict) for r in grader.map(jobs)] == [("g1", "ok"), ("g2", "ok")]
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("".join(json.dumps(j.to_json()) + "\n" for j in jobs))
    done = subprocess.run([sys.executable, "-m", "pytest_minictr", "grade", "--ray",
                           cluster.address, str(lines)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert sorted((r["id"], r["verdict"]) for r in map(json.loads, done.stdout.splitlines())) \
        == [("g1", "ok"), ("g2", "ok")]


def test_the_memory_limit_is_the_tasks_memory_resource(cluster, ray):
    backend = RayBackend(cluster.address)
    free = ray.available_resources()["memory"]
    results = []
    runner = threading.Thread(target=lambda: results.extend(
        backend.map([job("big", seconds=3, memory=700 * MiB)])))
    runner.start()
    deadline = time.monotonic() + 60
    while ray.available_resources().get("memory", 0) > free - 700 * MiB and runner.is_alive():
        assert time.monotonic() < deadline, "the job's memory was never reserved"
        time.sleep(0.05)
    seen = ray.available_resources().get("memory", 0)
    runner.join()
    assert free - seen == pytest.approx(700 * MiB, abs=MiB)
    assert [r.verdict for r in results] == ["ok"]


def test_a_job_larger_than_every_node_is_an_infra_error_at_once(cluster):
    started = time.monotonic()
    [result] = RayBackend(cluster.address).map([job("huge", memory=4096 * MiB)])
    assert result.verdict == "infra_error" and "exceeds every node" in result.error
    assert time.monotonic() - started < 10


def remove_a_node_mid_batch(cluster, node: dict, backend: RayBackend, jobs: list[Job]) -> list:
    """Grade `jobs` on a cluster of four nodes, and take away a node (not the head) while it
    runs one of them, as a machine that dies: its workers killed at once, then its raylet. (A
    raylet killed alone leaves its workers running long enough to hand their results over:
    they go straight to the caller.) A fourth node replaces the one taken."""
    from ray._private import ray_constants
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    raylets = {other.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: other
               for other in cluster.worker_nodes}
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(backend.imap_unordered(jobs)))
    runner.start()
    deadline = time.monotonic() + 90
    # Ray titles a worker for the task it runs: `ray::grade ID` (RayBackend names the tasks)
    while not (busy := [raylet for raylet in raylets if any(
            title.startswith(b"ray::grade ")
            for title in ray_workers(raylet).values())]):
        # a worker killed before its task began costs the task no retry: that proves nothing
        assert time.monotonic() < deadline and runner.is_alive(), "no node got work"
        time.sleep(0.05)
    for pid in ray_workers(busy[0]):
        os.kill(pid, signal.SIGKILL)
    cluster.remove_node(raylets[busy[0]], allow_graceful=False)
    runner.join(timeout=240)
    assert not runner.is_alive()
    return results


def test_a_node_removed_mid_batch_costs_nothing(cluster, node):
    jobs = [job(f"lost-{index}", seconds=2) for index in range(10)]
    workdir = tempfile.mkdtemp(dir=node["temp_dir"])
    backend = RayBackend(cluster.address, workdir=workdir)
    results = remove_a_node_mid_batch(cluster, node, backend, jobs)
    assert sorted((r.id, r.verdict) for r in results) == sorted((j.id, "ok") for j in jobs)
    # what the killed workers left is swept by the next job on the node
    backend.map([job(f"sweep-{index}") for index in range(6)])
    assert os.listdir(workdir) == []


def test_a_job_out_of_retries_is_an_infra_error_never_a_loss(cluster, node):
    jobs = [job(f"once-{index}", seconds=2) for index in range(10)]
    backend = RayBackend(cluster.address, retries=0,
                         workdir=tempfile.mkdtemp(dir=node["temp_dir"]))
    results = remove_a_node_mid_batch(cluster, node, backend, jobs)
    assert sorted(r.id for r in results) == sorted(j.id for j in jobs)
    lost = [r for r in results if r.verdict == "infra_error"]
    assert lost and all(r.error.startswith("on Ray: ") for r in lost), results
    assert {r.verdict for r in results} == {"ok", "infra_error"}
