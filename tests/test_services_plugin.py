"""The `minictr_service` fixture, as a user writes it: a service per scope, stopped at the
scope's end, its log tail in a failing test's report, one per xdist worker."""

from __future__ import annotations

import shutil

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(300)

SERVICES = '''
import json, os, socket, urllib.request
import pytest

HTTP = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"]
SEEN = os.environ["SEEN_FILE"]

@pytest.fixture(scope="module")
def web(minictr_service):
    return minictr_service(recipe="python3", command=HTTP, ports=[8000], memory="128M",
                           wait_for_port=8000)

@pytest.fixture
def echo(minictr_service):
    return minictr_service(binaries=["sh", "sleep"], command=["sh", "-c", "echo echo-was-here; "
                           "echo to-stderr >&2; exec sleep 60"], wait_for_output=rb"here")

def note(container):
    with open(SEEN, "a") as f:
        f.write(json.dumps([container.id, *container.address(8000)]) + "\\n")

def test_one(web):
    assert urllib.request.urlopen("http://%s:%d/" % web.address(8000)).status == 200
    note(web)

def test_two(web):
    note(web)

def test_fails_with_the_log(web, echo):
    assert False, "on purpose"

def test_in_the_body(minictr_service):
    body = minictr_service(binaries=["sh", "sleep"], command=["sleep", "60"])
    assert body.status == "running"
'''


@pytest.mark.needs_limits
def test_a_module_service_is_shared_stopped_after_and_logs_a_failure(pytester, cache_dir,
                                                                     tmp_path, monkeypatch):
    seen = tmp_path / "seen"
    monkeypatch.setenv("SEEN_FILE", str(seen))
    pytester.makepyfile(test_services=SERVICES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers",
                                           f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(passed=3, failed=1)
    ids = {line.split('"')[1] for line in seen.read_text().splitlines()}
    assert len(ids) == 1  # one service for the module's tests
    # the failing test's report: the log tails of the services of its fixtures
    result.stdout.fnmatch_lines(["*- minictr service web -*", "*GET / HTTP*",
                                 "*- minictr service echo -*", "*echo-was-here*",
                                 "*to-stderr*"])
    import json
    import socket
    for line in seen.read_text().splitlines():
        _, host, port = json.loads(line)
        with socket.socket() as sock:  # stopped with its module: the port is closed
            assert sock.connect_ex((host, port)) != 0


@pytest.mark.needs_limits
def test_services_under_xdist_each_worker_its_own(pytester, cache_dir, tmp_path, monkeypatch):
    pytest.importorskip("xdist")
    seen = tmp_path / "seen"
    monkeypatch.setenv("SEEN_FILE", str(seen))
    pytester.makepyfile(test_services=SERVICES.replace('scope="module"', 'scope="session"'))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                           f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(passed=3, failed=1)
    ports = {line for line in seen.read_text().splitlines()}
    assert len(ports) >= 1 and len({p.split(",")[-1] for p in ports}) == len(ports)


def test_a_service_that_is_not_ready_fails_its_fixture_and_is_stopped(pytester, cache_dir):
    if not shutil.which("sh"):
        pytest.skip("needs sh")
    pytester.makepyfile(test_never='''
import pytest

@pytest.fixture
def never(minictr_service):
    return minictr_service(binaries=["sh"], command=["sh", "-c", "echo no luck >&2; exit 4"],
                           wait_for_port=5432, ready_timeout=20)

def test_never(never):
    pass
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ContainerNotReadyError*waited for port 5432*exited with "
                                 "status 4*", "*no luck*"])
