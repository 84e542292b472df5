"""Published ports and pods without root, as a real account made for the purpose (useradd
gives it subordinate ids, as on any Debian machine): the forwarder enters the container's
user namespace before its network namespace, and a pod's containers share its user
namespace."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
ACCOUNT = "minictr-services"

SCRIPT = r"""
import json, sys, urllib.request
from pytest_minictr import ContainerRuntime, RootfsBuilder
builder = RootfsBuilder(cache_dir=sys.argv[1])
python = builder.build(recipe="python3")
http = ["python3", "-m", "http.server", "--bind", "127.0.0.1"]
seen = {}
with ContainerRuntime() as runtime:
    server = runtime.run(python, [*http, "8000"], ports=[8000], timeout=120)
    server.wait_for_port(8000, timeout=30)
    seen["published"] = urllib.request.urlopen("http://%s:%d/" % server.address(8000)).status
    pod = runtime.pod(ports=[8001])
    inside = runtime.run(python, [*http, "8001"], pod=pod, timeout=120)
    inside.wait_for_port(8001, timeout=30)
    client = runtime.run(python, ["python3", "-c", "import urllib.request; print(urllib."
                                  "request.urlopen('http://127.0.0.1:8001/').status)"],
                         pod=pod, timeout=120).wait()
    seen["pod client"] = client.stdout.decode().strip() or client.stderr.decode()
    seen["pod port"] = urllib.request.urlopen("http://%s:%d/" % pod.address(8001)).status
    if sys.argv[2] == "redis":
        redis = runtime.run(builder.build(recipe="redis"), ports=[6379], timeout=120)
        redis.wait_for_output(rb"Ready to accept connections", timeout=30)
        seen["redis"] = redis.address(6379)
    print(json.dumps(seen), flush=True)
    sys.stdin.read()  # the test talks to redis, then lets us go
    seen["addresses"] = [server.address(8000), pod.address(8001)]
print(json.dumps(seen["addresses"]))
"""


@pytest.fixture(scope="module")
def account():
    """A real account, made here (and removed): `useradd` as an administrator would."""
    yield from made_account(ACCOUNT)


@pytest.fixture(scope="module")
def account_without_ids():
    """A real account to which useradd gave no subordinate ids (as with SUB_UID_COUNT=0 in
    login.defs): container root is its uid alone."""
    yield from made_account(f"{ACCOUNT}-1", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0")


def made_account(name: str, *options: str):
    if os.geteuid() != 0:
        pytest.skip("needs root to create an account")
    for program in ("useradd", "userdel", "setpriv", SYSTEM_PYTHON):
        if not shutil.which(program):
            pytest.skip(f"{program} is not installed")
    closed = [str(d) for d in [REPO, *REPO.parents] if not os.stat(d).st_mode & 0o001]
    if closed:
        pytest.skip(f"another account cannot reach this checkout ({closed[0]} is closed)")
    made = False
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", *options, name], check=True, timeout=60)
        made = True
    yield pwd.getpwnam(name)
    if made:
        subprocess.run(["userdel", "--remove", name], timeout=60, capture_output=True)


def test_ports_and_pods_for_a_real_unprivileged_account(account):
    cache = tempfile.mkdtemp(prefix="minictr-services-")
    os.chown(cache, account.pw_uid, account.pw_gid)
    with_redis = "redis" if shutil.which("redis-server") and shutil.which("redis-cli") else "-"
    try:
        script = subprocess.Popen(
            ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
             "--init-groups", SYSTEM_PYTHON, "-c", SCRIPT, cache, with_redis],
            env={"PYTHONPATH": str(REPO), "HOME": account.pw_dir, "PATH": "/usr/bin:/bin"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = json.loads(script.stdout.readline() or "{}")
            if "redis" in seen:
                host, port = seen["redis"]
                done = subprocess.run(["redis-cli", "-h", host, "-p", str(port), "PING"],
                                      capture_output=True, text=True, timeout=30)
                assert done.stdout == "PONG\n"
            out, err = script.communicate("", timeout=120)
        finally:
            script.kill()
            script.wait()
        assert script.returncode == 0, err
        assert (seen["published"], seen["pod client"], seen["pod port"]) == (200, "200", 200)
        # the account's runtime closed: its forwarders and listeners went with it
        for host, port in json.loads(out):
            with socket.socket() as sock:
                assert sock.connect_ex((host, port)) != 0
        leftover = subprocess.run(["pgrep", "-u", account.pw_name], capture_output=True,
                                  text=True)
        assert leftover.stdout == "", leftover.stdout
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_postgresql_without_subordinate_ids_says_what_is_missing(account_without_ids):
    """initdb and the server run as uid 999: a container of one uid cannot have it, and the
    recipe says so before chown fails with "Invalid argument"."""
    if not glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        pytest.skip("PostgreSQL is not installed (Debian: postgresql)")
    assert account_without_ids.pw_name not in Path("/etc/subuid").read_text()
    cache = tempfile.mkdtemp(prefix="minictr-services-")
    os.chown(cache, account_without_ids.pw_uid, account_without_ids.pw_gid)
    try:
        done = subprocess.run(
            ["setpriv", f"--reuid={account_without_ids.pw_uid}",
             f"--regid={account_without_ids.pw_gid}", "--init-groups", SYSTEM_PYTHON, "-m",
             "pytest_minictr", "run", "--recipe", "postgresql", "--timeout", "60"],
            env={"PYTHONPATH": str(REPO), "HOME": account_without_ids.pw_dir,
                 "PATH": "/usr/bin:/bin", "MINICTR_CACHE_DIR": cache},
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert done.returncode == 1
    assert done.stderr == ("minictr: postgresql needs subordinate ids (newuidmap and a range in "
                           "/etc/subuid; see minictr doctor) or root: initdb and the server run "
                           "as uid 999, which this container cannot map\n")
