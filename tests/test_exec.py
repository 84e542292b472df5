"""Another command in a running container (`Container.exec`, the fixture's start/exec), and
its figures while it runs (`Container.stats`), on the real kernel."""

from __future__ import annotations

import os
import time

import pytest

from pytest_minictr import ContainerNotFoundError, RootfsBuilder

pytestmark = pytest.mark.usefixtures("no_leftovers")
NAMESPACES = ("pid", "net", "mnt", "uts", "ipc", "cgroup", "user")
SHOW_NAMESPACES = "readlink " + " ".join(f"/proc/self/ns/{name}" for name in NAMESPACES)
CONFINEMENT = "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status; cat /proc/self/uid_map"
BUSYBOX = "/bin/busybox"


@pytest.fixture
def running(runtime):
    """running(rootfs, script, **run_keywords): a container that has done `script` and idles;
    killed at the end of the test, whatever happened."""
    started = []

    def start(rootfs, script: str, **kwargs):
        container = runtime.run(rootfs, ["sh", "-c", f"{script}; touch /tmp/ready; sleep 60"],
                                **kwargs)
        started.append(container)
        deadline = time.monotonic() + 10
        while container.exec(["cat", "/tmp/ready"]).returncode != 0:
            assert time.monotonic() < deadline, "the container never got ready"
            time.sleep(0.02)
        return container
    yield start
    for container in started:
        container.kill()


def test_exec_joins_the_first_commands_namespaces_files_and_hostname(running, rootfs):
    container = running(rootfs, f"{SHOW_NAMESPACES} > /tmp/first; echo hi > /data",
                        hostname="box-7")
    result = container.exec(["sh", "-c", f"cat /tmp/first; {SHOW_NAMESPACES}; cat /data; "
                                         "hostname; pwd"])
    lines = result.stdout.decode().splitlines()
    first, mine = lines[:len(NAMESPACES)], lines[len(NAMESPACES):2 * len(NAMESPACES)]
    assert first == mine and len(set(first)) == len(NAMESPACES)
    assert lines[2 * len(NAMESPACES):] == ["hi", "box-7", "/"]
    # and none of them is the host's
    host = [os.readlink(f"/proc/self/ns/{name}") for name in NAMESPACES]
    assert not set(host) & set(mine[:-1] if os.geteuid() else mine)


@pytest.mark.parametrize("keywords", [{}, {"user": False, "capabilities": ["NET_RAW"]},
                                      {"rlimits": {"nofile": 77}, "seccomp": False}],
                         ids=["default", "host-root-net-raw", "rlimits-no-seccomp"])
def test_exec_is_confined_as_the_first_command(running, rootfs, keywords):
    if keywords.get("user") is False and os.geteuid() != 0:
        pytest.skip("user=False needs root")
    container = running(rootfs, f"{{ {CONFINEMENT}; ulimit -n; }} > /tmp/first",
                        **keywords)
    result = container.exec(["sh", "-c", f"cat /tmp/first; echo; {CONFINEMENT}; ulimit -n"])
    first, mine = result.stdout.decode().split("\n\n")
    assert first == mine.rstrip("\n") + "\n" or first.rstrip("\n") == mine.rstrip("\n")


def test_exec_takes_input_env_and_a_timeout_of_its_own(running, rootfs):
    container = running(rootfs, "true", env={"A": "1"})
    echoed = container.exec(["sh", "-c", 'cat; echo "$A$B"'], input=b"in\n", env={"B": "2"})
    assert echoed.stdout == b"in\n12\n" and echoed.returncode == 0
    late = container.exec(["sleep", "10"], timeout=0.3)
    assert late.timed_out and late.returncode == -9
    assert container.status == "running"  # the exec's limit is its own


def test_an_exec_dies_with_its_container(runtime, rootfs):
    container = runtime.run(rootfs, ["sleep", "1"])
    started = time.monotonic()
    result = container.exec(["sleep", "30"])
    assert result.returncode == -9 and time.monotonic() - started < 10
    assert container.wait().returncode == 0


def test_exec_and_stats_on_an_ended_container_say_so(runtime, rootfs):
    container = runtime.run(rootfs, ["true"])
    container.wait()
    with pytest.raises(ContainerNotFoundError, match="is not running"):
        container.exec(["true"])
    with pytest.raises(ContainerNotFoundError, match="is not running"):
        container.stats()
    assert container.exec  # the handle stays usable for wait()
    assert runtime.list() == []


def test_stats_see_what_the_container_holds(running, rootfs):
    if os.geteuid() != 0:
        pytest.skip("cgroup figures need root (or a delegated cgroup v2)")
    container = running(rootfs, "head -c 33554432 /dev/zero > /tmp/blob",
                        memory_limit="256M", pids_limit=20)
    stats = container.stats()
    assert stats.memory_current >= 32 * 1024**2 and stats.memory_peak >= stats.memory_current
    assert stats.processes == 2  # sh and its sleep: not our init, not an exec's helper
    assert stats.cpu_time > 0 and not stats.oom_killed
    assert (stats.limits.memory, stats.limits.pids) == (256 * 1024**2, 20)
    container.exec(["rm", "/tmp/blob"])
    assert container.stats().memory_current < stats.memory_current - 16 * 1024**2


@pytest.fixture(scope="module")
def busybox_rootfs(tmp_path_factory):
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} is not installed (Debian: busybox-static)")
    return RootfsBuilder(cache_dir=tmp_path_factory.mktemp("cache")).build(
        binaries=["sh", BUSYBOX])


def test_a_server_started_in_a_container_answers_an_exec_over_its_loopback(runtime,
                                                                            busybox_rootfs):
    server = runtime.run(busybox_rootfs, [
        "sh", "-c", f"{BUSYBOX} mkdir /www && echo hello > /www/index && "
                    f"exec {BUSYBOX} httpd -f -p 127.0.0.1:80 -h /www"])
    fetch = (f"for i in $({BUSYBOX} seq 100); do {BUSYBOX} wget -q -O - "
             f"http://127.0.0.1/index && exit; {BUSYBOX} sleep 0.05; done; exit 1")
    result = server.exec(["sh", "-c", fetch])
    assert (result.returncode, result.stdout) == (0, b"hello\n"), result.stderr
    assert server.stop().returncode == -15


@pytest.mark.container(binaries=["sh", "cat", "sleep", "hostname"], hostname="svc")
def test_the_fixture_starts_execs_and_stops(container):
    container.run("echo config > /etc/app.conf")       # prepared on the test's layer
    container.start("cat /etc/app.conf > /tmp/seen; sleep 60")
    deadline = time.monotonic() + 10
    while container.exec("cat /tmp/seen").stdout != b"config\n":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert container.exec(["hostname"]).stdout == b"svc\n"
    with pytest.raises(Exception, match=r"use container.exec"):
        container.run("true")
    assert container.stop().returncode == -15
    assert container.run("cat /tmp/seen; cat /etc/app.conf").stdout == b"config\n"
