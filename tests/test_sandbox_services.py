"""Services and sandboxed bodies together (#26): a body reaches the services its fixtures
started at the very address the fixture reports, and nothing else of the host; a connection
the sandbox's network could not make says so in the test's report."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import textwrap

import pytest

from pytest_minictr.container.network import hand_over_service_addresses
from pytest_minictr.forwarder.services import ServiceRelay
from pytest_minictr.launcher import pods
from pytest_minictr.plugin.services import body_network_notes
from tests.unprivileged import account_fixture, place_with_tests

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(300)

INNER_TIMEOUT = 240  # seconds an inner session may take

SERVICES = '''
import os, socket, urllib.request
import pytest

HTTP = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"]

@pytest.fixture(scope="module")
def web(minictr_service):
    return minictr_service(recipe="python3", command=HTTP, ports=[8000], wait_for_port=8000)

@pytest.fixture
def echo(minictr_service):
    """A function-scoped service, on a second port, published on another loopback address."""
    return minictr_service(recipe="python3", ports={7: ("127.0.0.2", 0)}, wait_for_port=7,
                           command=["python3", "-c", "import socket\\n"
                                    "s = socket.create_server(('127.0.0.1', 7))\\n"
                                    "while True:\\n"
                                    "    c = s.accept()[0]; c.sendall(c.recv(100)); c.close()"])

@pytest.fixture
def host_server():
    """A listener on the host's loopback that no service publishes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()
    server.close()

def sandboxed():
    return os.getpid() == 2

def test_reaches_the_module_service(web):
    assert sandboxed()
    with urllib.request.urlopen("http://%s:%d/" % web.address(8000), timeout=10) as reply:
        assert reply.status == 200

def test_reaches_both_services(web, echo):
    assert sandboxed()
    with socket.create_connection(echo.address(7), timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
    with urllib.request.urlopen("http://%s:%d/" % web.address(8000), timeout=10) as reply:
        assert reply.status == 200

def test_not_the_hosts_other_listeners(web, host_server):
    assert sandboxed()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(host_server, timeout=5)
    with pytest.raises(OSError):
        socket.create_connection(("1.1.1.1", 53), timeout=2)
'''


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args,
                                         timeout=INNER_TIMEOUT)


def test_sandboxed_bodies_reach_the_services_of_their_fixtures(pytester, cache_dir):
    pytester.makepyfile(test_services=SERVICES)
    result = run(pytester, "--minictr-sandbox-tests", f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(passed=3)


def test_a_marked_body_reaches_a_service_of_a_session_fixture(pytester, cache_dir):
    pytester.makepyfile(test_marked=SERVICES.replace('scope="module"', 'scope="session"')
                        .replace("def test_", "@pytest.mark.container\ndef test_"))
    result = run(pytester, f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(passed=3)


DOWN = '''
import socket, pytest

@pytest.fixture
def stopped(minictr_service):
    service = minictr_service(recipe="python3", ports=[8000], wait_for_port=8000,
                              command=["python3", "-m", "http.server", "8000"])
    service.stop()
    return service

@pytest.mark.container
def test_the_service_is_down(stopped):
    with socket.create_connection(stopped.address(8000), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        sock.recv(100)

@pytest.fixture
def host_server():
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()
    server.close()

@pytest.mark.container
def test_a_server_of_the_host(host_server):
    socket.create_connection(host_server, timeout=5)
'''


def test_a_refused_connection_is_explained_in_the_sandbox_network_section(pytester, cache_dir):
    pytester.makepyfile(test_down=DOWN)
    result = run(pytester, f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(failed=2)
    section = ["*- minictr: sandbox network -*",
               "the body has a network namespace of its own: it reaches the services its "
               "fixtures started, at their addresses, and nothing else of the host"]
    result.stdout.fnmatch_lines([
        "E * ConnectionResetError: *", *section,
        "relayed into it: 127.0.0.1:* (stopped)",
        "127.0.0.1:* (stopped): refused on the host (Connection refused): is the service down?",
        # a server of the host's: refused inside, and the section says why
        "E * ConnectionRefusedError: *", *section,
        "relayed into it: none (no minictr_service runs)"])


account = account_fixture("mctrnet")


def test_rootless_bodies_reach_services_for_a_real_account(account):
    source = textwrap.dedent(SERVICES)
    with place_with_tests(account, "minictr-netbody-", source) as (runner, place, tests):
        done = runner("-m", "pytest", "-p", "pytest_minictr.plugin", "-p", "no:cacheprovider",
                      "-rA", "--minictr-sandbox-tests", f"--basetemp={place}/home/tmp",
                      f"--minictr-cache-dir={place}/home/cache", str(tests), cwd=tests)
        assert "3 passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


# --- the pieces: the body's listeners, and what the relay takes of them -------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_body_hands_over_its_listeners_and_names_an_address_it_cannot_have():
    port = free_port()
    body, relay_end = socket.socketpair()
    report_r, report_w = os.pipe()
    try:
        hand_over_service_addresses(body.detach(), (("192.0.2.1", 9), ("127.0.0.1", port)),
                                    report_w)
        _, fds, _, _ = socket.recv_fds(relay_end, 16, 8)
        assert len(fds) == 1
        with socket.socket(fileno=fds[0]) as listener:
            assert listener.getsockname() == ("127.0.0.1", port)
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert json.loads(os.read(report_r, 4096)) == {"unreachable": [
            ["192.0.2.1", 9, "cannot listen on it in the sandbox: Cannot assign requested "
             "address"]]}
        assert relay_end.recv(1) == b""  # the body closed its end
    finally:
        relay_end.close()
        os.close(report_r)
        os.close(report_w)


def test_the_relay_takes_only_listeners_at_a_bodys_addresses_and_lets_go_with_the_worker():
    control, relay_control = socket.socketpair(type=socket.SOCK_SEQPACKET)
    worker, intake = socket.socketpair()
    allowed, other = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    not_listening, datagram = socket.socket(), socket.socket(type=socket.SOCK_DGRAM)
    not_listening.bind(("127.0.0.1", 0))
    relay = ServiceRelay(relay_control)
    idle = set(relay.handlers)
    try:
        # the launcher's order: this body may reach `allowed`'s address, nothing else
        socket.send_fds(control, [json.dumps([allowed.getsockname()]).encode()],
                        [intake.detach()])
        relay.on_control(select.EPOLLIN)
        (body,) = set(relay.handlers) - idle
        # the body's listeners: one at that address, then what a body should never send
        socket.send_fds(worker, [b"L"], [sock.fileno() for sock in (allowed, other,
                                                                    not_listening, datagram)])
        relay.handlers[body](select.EPOLLIN)
        taken = [socket.socket(fileno=os.dup(fd)) for fd in set(relay.handlers) - idle - {body}]
        assert [sock.getsockname() for sock in taken] == [allowed.getsockname()]
        for sock in taken:
            sock.close()
        worker.close()  # done with the body: its listeners go
        relay.handlers[body](select.EPOLLIN)
        assert set(relay.handlers) == idle
    finally:
        for sock in (control, worker, allowed, other, not_listening, datagram):
            sock.close()


def test_a_relay_the_launcher_cannot_fork_is_named_in_the_report(monkeypatch):
    def no_fork(*_args):
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    monkeypatch.setattr(pods, "_fork", no_fork)
    worker, intake = socket.socketpair()
    with worker:
        pods.Pods(rootless=False, own_pidfd=-1).relay_for_body(intake.detach(),
                                                               [["127.0.0.1", 5432]])
        told = [json.loads(line) for line in worker.recv(4096).splitlines()]
        assert worker.recv(1) == b""  # the launcher let go of the body's socket
    notes = body_network_notes({("127.0.0.1", 5432): "pg"}, "loopback", [], told)
    assert notes[1:] == ("relayed into it: none",
                         "the launcher has no relay to the services: "
                         "Resource temporarily unavailable")
