"""Containers as services: published ports reached by real clients (urllib, psql,
redis-cli), readiness waits, pods, the server recipes; root here, a real account below
(tests/test_services_rootless.py), the fixture in tests/test_services_plugin.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pytest_minictr import (
    ConfigError,
    ContainerNotReadyError,
    ContainerRuntime,
    RootfsBuilder,
    RootfsError,
)
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(120)
HTTP = ["python3", "-m", "http.server", "--bind", "127.0.0.1"]


@pytest.fixture(scope="module")
def python_rootfs(cache_dir) -> Path:
    return RootfsBuilder(cache_dir=cache_dir).build(
        recipe="python3", binaries=["head", "sleep", "hostname", "ls", "grep"])


def get(address: tuple[str, int], path: str = "/") -> int:
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as reply:
        return reply.status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET) as sock:
        return sock.connect_ex(address) != 0


def processes_in_netns(inode: int) -> list[int]:
    """Host pids of the processes in the network namespace `inode` (the forwarder among
    them, while it runs)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


# --- published ports --------------------------------------------------------------------------

@pytest.mark.needs_root
def test_a_published_port_is_reached_on_the_callers_loopback(runtime, python_rootfs, no_leftovers):
    server = runtime.run(python_rootfs, [*HTTP, "8000"], ports=[8000], timeout=60)
    server.wait_for_port(8000, timeout=20)
    host, port = server.address(8000)
    assert host == "127.0.0.1" and port > 0
    assert get((host, port)) == 200
    # the request reached the server inside: it logged it
    assert server.wait_for_output(rb'"GET / HTTP/1.1" 200', timeout=10)
    netns = netns_of(server.pid)
    server.stop()
    # the forwarder went with the container: no listener, no process in its namespace
    assert refused((host, port))
    assert eventually(lambda: not processes_in_netns(netns), 5)


def test_a_chosen_host_port_and_an_explicit_address(runtime, python_rootfs):
    chosen = free_port()
    server = runtime.run(python_rootfs, [*HTTP, "80"], ports={80: chosen, 81: ("::1", 0)},
                         timeout=60)
    try:
        server.wait_for_port(80, timeout=20)
        assert server.address(80) == ("127.0.0.1", chosen)
        assert get(("127.0.0.1", chosen)) == 200
        assert server.address(81)[0] == "::1"
        # nothing listens on 81 inside: the connection is accepted outside, then closed
        with pytest.raises(OSError):
            get(server.address(81))
    finally:
        server.stop()


def test_ports_are_on_loopback_unless_asked_otherwise(runtime, python_rootfs):
    server = runtime.run(python_rootfs, [*HTTP, "8000"],
                         ports=["8000", "0.0.0.0::8001"], timeout=60)
    try:
        assert server.address(8000)[0] == "127.0.0.1"
        assert server.address(8001)[0] == "0.0.0.0"
        with pytest.raises(ConfigError, match=r"port 5432 is not published \(published: "
                                              r"8000, 8001"):
            server.address(5432)
    finally:
        server.stop()


@pytest.mark.parametrize("ports, message", [
    ([0], r"expected ports from 1 to 65535"),
    (["localhost::80"], r"'localhost' is no IP address"),
    ({80: "http"}, r"expected ports from 0 to 65535"),
    ([80, "80"], r"container port 80 is published twice"),
    ("80", r"expected a list of ports"),
])
def test_bad_ports_are_refused_before_anything_starts(runtime, rootfs, ports, message,
                                                      no_leftovers):
    with pytest.raises(ConfigError, match=message):
        runtime.run(rootfs, ["true"], ports=ports)


@pytest.mark.needs_root
def test_a_host_port_in_use_is_one_clear_error_and_nothing_is_left(runtime, rootfs, no_leftovers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot publish container port 80 on "
                                              rf"127.0.0.1:{port}: Address already in use"):
            runtime.run(rootfs, ["true"], ports={80: port, 81: 0})
    assert runtime.list() == []


def test_no_network_and_ports_do_not_go_together(runtime, rootfs):
    with pytest.raises(ConfigError, match=r"network='none' and ports=\[80\]"):
        runtime.run(rootfs, ["true"], ports=[80], network="none")


def test_a_bulk_transfer_and_many_connections_go_through(runtime, python_rootfs, tmp_path):
    # (a file server in the container; urllib checks what arrives byte for byte)
    server = runtime.run(python_rootfs, ["sh", "-c", "head -c 8000000 /dev/urandom > /tmp/big"
                                         " && cd /tmp && exec python3 -m http.server 8000"],
                         ports=[8000], timeout=60)
    try:
        server.wait_for_port(8000, timeout=20)
        host, port = server.address(8000)
        with urllib.request.urlopen(f"http://{host}:{port}/big", timeout=30) as reply:
            assert len(reply.read()) == 8_000_000
        assert all(get((host, port)) == 200 for _ in range(30))
    finally:
        server.stop()


# --- readiness --------------------------------------------------------------------------------

def test_wait_for_port_names_what_it_awaited_and_the_stderr_tail(runtime, rootfs):
    idle = runtime.run(rootfs, ["sh", "-c", "echo starting up >&2; sleep 30"], timeout=60)
    try:
        with pytest.raises(ContainerNotReadyError) as caught:
            idle.wait_for_port(5432, timeout=0.5)
    finally:
        idle.stop(grace=0)
    error = caught.value
    assert "port 5432 to accept connections inside the container" in str(error)
    assert "not within 0.5 s; it still runs" in str(error)
    assert error.ended is None and error.stderr_tail == b"starting up\n"


def test_a_container_that_ends_first_says_how(runtime, rootfs):
    failing = runtime.run(rootfs, ["sh", "-c", "echo 'FATAL: no config' >&2; exit 3"])
    with pytest.raises(ContainerNotReadyError) as caught:
        failing.wait_for_output(rb"ready to accept", timeout=20)
    assert "it ended first: exited with status 3" in str(caught.value)
    assert "FATAL: no config" in str(caught.value)
    assert caught.value.ended == "exited with status 3"


def test_wait_for_output_sees_what_came_before_and_after(runtime, rootfs):
    container = runtime.run(rootfs, ["sh", "-c", "echo one; sleep 0.3; echo two >&2; sleep 30"],
                            timeout=60)
    try:
        assert container.wait_for_output(rb"one", timeout=10).group() == b"one"
        assert container.wait_for_output(rb"t(w)o", timeout=10).group(1) == b"w"
        with pytest.raises(ConfigError, match="expected a bytes regex"):
            container.wait_for_output("two", timeout=1)
    finally:
        container.stop(grace=0)


def test_wait_for_port_without_published_ports(runtime, python_rootfs):
    server = runtime.run(python_rootfs, [*HTTP, "9000"], timeout=60)
    try:
        server.wait_for_port(9000, timeout=20)
        result = server.exec(["python3", "-c", "import urllib.request; print(urllib.request."
                                               "urlopen('http://127.0.0.1:9000/').status)"])
        assert result.stdout == b"200\n"
    finally:
        server.stop()


# --- pods -------------------------------------------------------------------------------------

@pytest.mark.needs_root
def test_a_client_container_reaches_a_server_container_in_its_pod(runtime, python_rootfs,
                                                                  no_leftovers):
    pod = runtime.pod(ports=[8000])
    server = runtime.run(python_rootfs, [*HTTP, "8000"], pod=pod, hostname="server",
                         timeout=60)
    server.wait_for_port(8000, timeout=20)
    client = runtime.run(python_rootfs, ["sh", "-c", "hostname; ls /proc | grep -c '^[0-9]'; "
                                         "python3 -c \"import urllib.request; print(urllib."
                                         "request.urlopen('http://127.0.0.1:8000/').status)\""],
                         pod=pod, hostname="client", memory_limit="64M", timeout=60)
    result = client.wait()
    hostname, processes, status = result.stdout.decode().split()
    # one network; its own UTS and PID namespaces (it sees its init, sh and ls, not the
    # server), its own cgroup and limits
    assert (hostname, status) == ("client", "200"), result.stderr
    assert int(processes) <= 4
    assert netns_of(server.pid) != netns_of(os.getpid())
    assert get(pod.address(8000)) == 200  # the pod's port, published once for all
    netns = netns_of(server.pid)
    server.stop()
    # the last container ended: the pod's ports and namespace are gone
    assert refused(pod.address(8000))
    assert eventually(lambda: not processes_in_netns(netns), 5)
    with pytest.raises(ConfigError, match="has ended"):
        runtime.run(python_rootfs, ["true"], pod=pod)


def test_the_pods_namespace_lives_while_any_container_does(runtime, python_rootfs):
    pod = runtime.pod()
    first = runtime.run(python_rootfs, ["sleep", "60"], pod=pod, timeout=60)
    server = runtime.run(python_rootfs, [*HTTP, "8000"], pod=pod, timeout=60)
    try:
        first.stop(grace=0)  # the first one made the namespace; it is not needed to keep it
        server.wait_for_port(8000, timeout=20)
        late = runtime.run(python_rootfs, ["python3", "-c", "import socket; socket."
                                           "create_connection(('127.0.0.1', 8000)); print('in')"],
                           pod=pod, timeout=60).wait()
        assert late.stdout == b"in\n", late.stderr
    finally:
        server.stop()


def test_pod_keywords_are_checked(runtime, rootfs):
    pod = runtime.pod()
    try:
        with pytest.raises(ConfigError, match="publish them on the pod"):
            runtime.run(rootfs, ["true"], pod=pod, ports=[80])
        with pytest.raises(ConfigError, match=r"expected a pod made by runtime.pod"):
            runtime.run(rootfs, ["true"], pod="mypod")
        with pytest.raises(ConfigError, match="network capability"):
            runtime.run(rootfs, ["true"], pod=pod, capabilities=["NET_ADMIN"])
    finally:
        pod.close()


def test_an_unused_pod_lets_its_ports_go_when_closed(runtime):
    pod = runtime.pod(ports=[5432])
    address = pod.address(5432)
    assert not refused(address)  # bound and listening at once: the address is known
    pod.close()
    assert refused(address)


# --- the server recipes -----------------------------------------------------------------------

def needs(*programs: str) -> None:
    for program in programs:
        if not (shutil.which(program) or Path(program).exists()):
            pytest.skip(f"{program} is not installed (ci/install-deps installs it)")


@pytest.mark.needs_limits
def test_postgresql_queried_with_psql(runtime, cache_dir):
    needs("psql")
    rootfs = RootfsBuilder(cache_dir=cache_dir).build(recipe="postgresql")
    pg = runtime.run(rootfs, ports=[5432], memory_limit="256M", timeout=100)
    try:
        pg.wait_for_output(rb"database system is ready to accept connections", timeout=60)
        host, port = pg.address(5432)
        done = subprocess.run(["psql", "-h", host, "-p", str(port), "-U", "postgres", "-d",
                               "postgres", "-Atc", "create table t (n int); insert into t "
                               "values (41); select n + 1 from t; select current_user"],
                              capture_output=True, text=True, timeout=30)
        assert done.stdout.split()[-2:] == ["42", "postgres"], done.stderr
    finally:
        pg.stop()


@pytest.mark.needs_limits
def test_redis_queried_with_redis_cli(runtime, cache_dir):
    needs("redis-cli")
    rootfs = RootfsBuilder(cache_dir=cache_dir).build(recipe="redis")
    cache = runtime.run(rootfs, ports=[6379], memory_limit="64M", timeout=60)
    try:
        cache.wait_for_port(6379, timeout=20)
        host, port = cache.address(6379)
        cli = ["redis-cli", "-h", host, "-p", str(port)]
        subprocess.run([*cli, "SET", "greeting", "hello"], check=True, capture_output=True,
                       timeout=30)
        done = subprocess.run([*cli, "GET", "greeting"], capture_output=True, text=True,
                              timeout=30)
        assert done.stdout == "hello\n"
    finally:
        cache.stop()


def test_a_recipe_without_its_package_names_the_package(tmp_path, cache_dir):
    recipe = tmp_path / "mydb.toml"
    recipe.write_text('package = "mydb-server"\nbinaries = ["/usr/lib/mydb/*/bin/mydbd"]\n'
                      'command = ["mydbd"]\n')
    with pytest.raises(RootfsError, match=r"needs /usr/lib/mydb/\*/bin/mydbd, which this host "
                                          r"lacks: install the Debian package mydb-server"):
        RootfsBuilder(cache_dir=cache_dir).build(recipe=str(recipe))


def test_the_newest_installed_version_is_taken(tmp_path, cache_dir):
    for version in ("9.6", "15", "10"):
        (tmp_path / "versions" / version).mkdir(parents=True)
        (tmp_path / "versions" / version / "share.txt").write_text(version)
    recipe = tmp_path / "versions.toml"
    recipe.write_text(f'dirs = ["{tmp_path}/versions/*"]\nbinaries = ["true"]\n')
    built = RootfsBuilder(cache_dir=cache_dir).build(recipe=str(recipe))
    inside = built / str(tmp_path).lstrip("/") / "versions"
    assert (inside / "15" / "share.txt").exists() and not (inside / "9.6").exists()


def test_run_without_a_command_takes_the_recipes(runtime, cache_dir, rootfs):
    needs("redis-server")
    redis = RootfsBuilder(cache_dir=cache_dir).build(recipe="redis")
    server = runtime.run(redis, timeout=30)
    assert server.args[0] == "redis-server"
    server.stop(grace=0)
    with pytest.raises(ConfigError, match="has no default command"):
        runtime.run(rootfs)


def test_a_runtime_ends_published_containers_and_pods_on_close(python_rootfs):
    with ContainerRuntime() as own:
        pod = own.pod(ports=[1])
        server = own.run(python_rootfs, [*HTTP, "8000"], ports=[8000], timeout=60)
        server.wait_for_port(8000, timeout=20)
        addresses = [pod.address(1), server.address(8000)]
    assert all(refused(address) for address in addresses)


# --- the command line -------------------------------------------------------------------------

def test_the_cli_publishes_with_dockers_syntax_and_says_where(tmp_path, cache_dir, monkeypatch):
    """The README's commands: `run -d -p HOST:PORT -p ADDRESS::PORT`, `port ID [PORT]`."""
    monkeypatch.setenv("MINICTR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MINICTR_CACHE_DIR", str(cache_dir))
    minictr = [sys.executable, "-m", "pytest_minictr"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*minictr, *args], capture_output=True, text=True, timeout=60)
    chosen = free_port()
    started = cli("run", "-d", "-p", f"{chosen}:80", "-p", "127.0.0.1::6379", "--recipe",
                  "python3", "--", "python3", "-m", "http.server", "80")
    assert started.returncode == 0, started.stderr
    container_id = started.stdout.strip()
    try:
        listed = cli("port", container_id).stdout.splitlines()
        assert listed[0] == f"80/tcp -> 127.0.0.1:{chosen}"
        assert listed[1].startswith("6379/tcp -> 127.0.0.1:")
        assert cli("port", container_id, "80").stdout == f"127.0.0.1:{chosen}\n"
        assert eventually(lambda: not refused(("127.0.0.1", chosen)) and _serves(chosen), 20)
        missing = cli("port", container_id, "81")
        assert missing.returncode == 1 and "port 81 is not published" in missing.stderr
    finally:
        cli("stop", "-t", "0", container_id)
    assert refused(("127.0.0.1", chosen))
    bad = cli("run", "-p", "70000", "--recipe", "python3", "--", "true")
    assert bad.returncode != 0 and "-p: '70000': expected ports from 1 to 65535" in bad.stderr


def _serves(port: int) -> bool:
    try:
        return get(("127.0.0.1", port)) == 200
    except OSError:
        return False


def test_a_container_that_ends_at_once_still_publishes_and_probes_refuse(runtime, rootfs,
                                                                         no_leftovers):
    quick = runtime.run(rootfs, ["true"], ports=[80])
    address = quick.address(80)
    with pytest.raises(ContainerNotReadyError, match="ended first: exited with status 0"):
        quick.wait_for_port(80, timeout=10)
    assert quick.wait().returncode == 0
    assert refused(address)
