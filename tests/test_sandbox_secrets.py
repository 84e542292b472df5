"""A sandboxed body gets none of the host's secrets (#27, item 4) and sees the host's /tmp
read-only under its own (item 2): test files run by a real pytest in a subprocess, as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from pytest_minictr.plugin.secrets import looks_like_credential
from tests.unprivileged import account_fixture, place_with_tests

pytest_plugins = ["pytester"]

INNER_TIMEOUT = 240  # seconds an inner session may take (they take a few)
HOST_KEY = Path(f"/etc/ssh/ssh_host_minictr{os.getpid()}_key")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="hides what root could read")

SECRETS = """
import os, sys, pytest
import pytest_minictr

# what of /root a body sees: only the way to what it needs there (the Python, if there)
NEEDED = {p.split("/")[2] for p in (sys.prefix, sys.base_prefix) if p.startswith("/root/")}

@pytest.fixture
def fake_token(monkeypatch):
    monkeypatch.setenv("FAKE_API_TOKEN", "the suite's own")
    monkeypatch.setenv("CHANGED_TOKEN", "changed by the suite")

@pytest.mark.container(env={"SET_SECRET": "by the marker"})
def test_no_secrets(fake_token):
    assert open("/etc/shadow").read() == "" and open("/etc/gshadow").read() == ""
    assert set(os.listdir("/root")) <= NEEDED
    assert os.listdir("/run") == []                 # no host daemon's socket, no /run/user
    assert not os.path.exists("HOST_KEY") or open("HOST_KEY").read() == ""
    assert open(pytest_minictr.__file__).read().startswith('\"\"\"')  # the package under test
    assert "def test_no_secrets" in open(__file__).read()            # the project's files
    assert "MY_API_TOKEN" not in os.environ and "SSH_AUTH_SOCK" not in os.environ
    assert os.environ["FAKE_API_TOKEN"] == "the suite's own"  # set by a fixture: kept
    assert os.environ["CONFTEST_API_TOKEN"] == "the conftest's"  # by a conftest: kept
    assert os.environ["CHANGED_TOKEN"] == "changed by the suite"
    assert os.environ["KEPT_TOKEN"] == "kept" and os.environ["PLAIN"] == "plain"
    assert os.environ["SET_SECRET"] == "by the marker"

def test_worker_has_them():
    assert os.environ["MY_API_TOKEN"] == "do-not-leak" and os.listdir("/root")
"""

# A session fixture that makes a directory under the host's /tmp, as dateutil's do
MADE_UNDER_HOST_TMP = """
import os, shutil, tempfile, pytest

@pytest.fixture(scope="session")
def made():
    place = tempfile.mkdtemp(prefix="minictr-fixture-")
    open(os.path.join(place, "data"), "w").write("from the fixture")
    yield place
    shutil.rmtree(place)
"""

HOST_TMP = MADE_UNDER_HOST_TMP + """

@pytest.fixture(scope="module")
def factory_made(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "data"
    path.write_text("from the factory")
    return path

@pytest.mark.container
def test_body(made, factory_made, tmp_path):
    assert open(os.path.join(made, "data")).read() == "from the fixture"
    assert factory_made.read_text() == "from the factory"
    open(os.path.join(made, "data"), "a").write(", changed")  # in the body's copy only
    open({private!r}, "w").write("the body's own")
    (tmp_path / "out").write_text("kept")
    assert open({private!r}).read() == "the body's own"

def test_after(made, tmp_path_factory):
    assert not os.path.exists({private!r}), "the body's /tmp write reached the host"
    assert open(os.path.join(made, "data")).read() == "from the fixture"
    assert len(list(tmp_path_factory.getbasetemp().glob("test_body0/out"))) == 1
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args,
                                         timeout=INNER_TIMEOUT)


@pytest.mark.parametrize("name", ["MY_API_TOKEN", "GITHUB_TOKEN", "CI_JOB_TOKEN", "API_KEY",
                                  "AWS_REGION", "PGPASSWORD", "DB_PASS", "SSH_AUTH_SOCK",
                                  "CLIENT_SECRET", "GOOGLE_APPLICATION_CREDENTIALS"])
def test_credential_names(name):
    assert looks_like_credential(name)


@pytest.mark.parametrize("name", ["PYTHONHASHSEED", "TOKENIZERS_PARALLELISM", "HOME", "PATH",
                                  "PYTHON_KEYRING_BACKEND", "GIT_AUTHOR_NAME", "XAUTHORITY",
                                  "KEYBOARD_LAYOUT"])
def test_innocent_names(name):
    assert not looks_like_credential(name)


@needs_root
def test_body_sees_no_secrets(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    for name, value in (("MY_API_TOKEN", "do-not-leak"), ("KEPT_TOKEN", "kept"),
                        ("CHANGED_TOKEN", "the host's"),
                        ("PLAIN", "plain"), ("SSH_AUTH_SOCK", "/nowhere")):
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_secrets=SECRETS.replace("HOST_KEY", str(HOST_KEY)))
    pytester.makeconftest("import os\nos.environ['CONFTEST_API_TOKEN'] = \"the conftest's\"\n")
    pytester.makeini("[pytest]\nminictr_keep_env = KEPT_TOKEN\n")
    if not HOST_KEY.parent.is_dir():
        pytest.skip("no /etc/ssh on this host")
    try:  # an SSH host key where sshd keeps them (this host may have none of its own)
        HOST_KEY.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        result = run(pytester, "-n", "2")  # xdist's workers start after the conftest ran
    finally:
        HOST_KEY.unlink()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["minictr: sandboxed bodies do not see the homes *"
                                 "drops * credential-looking variables (*MY_API_TOKEN*)*"])
    assert "do-not-leak" not in result.stdout.str()
    # kept by the option and the environment too; and without a keep, gone
    pytester.makeini("[pytest]\n")
    run(pytester, "--minictr-keep-env", "KEPT_TOKEN").assert_outcomes(passed=2)
    monkeypatch.setenv("MINICTR_KEEP_ENV", "OTHER KEPT_TOKEN")
    run(pytester).assert_outcomes(passed=2)
    monkeypatch.delenv("MINICTR_KEEP_ENV")
    run(pytester).assert_outcomes(passed=1, failed=1)


RENAMED_OVER = """
import os, time, pytest

@pytest.mark.container(writable=["SIGNALS"])
def test_hidden_after_a_new_file_is_renamed_over_it():
    assert open("HOST_KEY").read() == ""
    open("SIGNALS/ready", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists("SIGNALS/renamed") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.exists("SIGNALS/renamed") and open("HOST_KEY").read() == ""
"""


@needs_root
def test_a_secret_replaced_while_a_body_runs_stays_hidden(pytester: pytest.Pytester):
    """As useradd, passwd and chpasswd replace /etc/shadow: a new file renamed over it. The
    body hides names, not the inode it found at its start."""
    if not HOST_KEY.parent.is_dir():
        pytest.skip("no /etc/ssh on this host")
    signals = pytester.path / "signals"
    signals.mkdir()
    pytester.makepyfile(test_renamed=RENAMED_OVER.replace("HOST_KEY", str(HOST_KEY))
                        .replace("SIGNALS", str(signals)))

    def rename_over_once_the_body_runs() -> None:
        deadline = time.monotonic() + INNER_TIMEOUT
        while not (signals / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        fresh = HOST_KEY.with_name(HOST_KEY.name + "+")
        fresh.write_text("-----BEGIN OPENSSH PRIVATE KEY----- (a new one)\n")
        os.rename(fresh, HOST_KEY)
        (signals / "renamed").touch()

    HOST_KEY.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    renamer = threading.Thread(target=rename_over_once_the_body_runs, daemon=True)
    renamer.start()
    try:
        result = run(pytester)
    finally:
        renamer.join(INNER_TIMEOUT)
        HOST_KEY.unlink()
    result.assert_outcomes(passed=1)


@needs_root
def test_project_in_a_home_is_shown_back():
    """A project under /root: its files and tmp_path there are seen, the rest of /root not."""
    project = Path(tempfile.mkdtemp(prefix="minictr-secrets-", dir="/root"))
    try:
        (project / "test_home.py").write_text(textwrap.dedent(f"""
            import os, sys, pytest
            NEEDED = {{p.split("/")[2] for p in (sys.prefix, sys.base_prefix)
                      if p.startswith("/root/")}}
            @pytest.mark.container
            def test_home(tmp_path):
                assert set(os.listdir("/root")) == {{{project.name!r}, *NEEDED}}
                shown = set(os.listdir({str(project)!r})) - {{"__pycache__"}}
                assert shown == {{"base", "test_home.py"}}
                (tmp_path / "written").write_text("in a home")
                with pytest.raises(OSError):
                    open("/root/elsewhere", "w")
            """))
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                               f"--basetemp={project}/base", "test_home.py"], cwd=project,
                              capture_output=True, text=True, timeout=INNER_TIMEOUT)
        assert "1 passed" in done.stdout, done.stdout[-3000:]
        assert (project / "base" / "test_home0" / "written").read_text() == "in a home"
    finally:
        shutil.rmtree(project)


@needs_root
def test_host_tmp_seen_under_private_tmp(pytester: pytest.Pytester):
    private = f"/tmp/minictr-body-{uuid.uuid4().hex}"
    pytester.makepyfile(test_tmp=HOST_TMP.format(private=private))
    try:
        run(pytester).assert_outcomes(passed=2)
    finally:
        assert not os.path.exists(private)


ROOTLESS = MADE_UNDER_HOST_TMP + """

@pytest.mark.container
def test_rootless_body(made, tmp_path):
    assert open(os.path.join(made, "data")).read() == "from the fixture"
    open("/tmp/minictr-rootless-body", "w").write("the body's own")
    assert "MY_API_TOKEN" not in os.environ
    assert all(os.listdir(os.path.join("/home", name)) == [] for name in os.listdir("/home"))
    (tmp_path / "x").write_text("mine")

def test_after(made):
    assert not os.path.exists("/tmp/minictr-rootless-body")
    assert os.environ["MY_API_TOKEN"] == "do-not-leak"
"""


account = account_fixture("mcsec")


def test_rootless_body_sees_host_tmp_not_secrets(account):
    """As a real account: the overlay /tmp in the body's own user namespace, homes hidden,
    tokens dropped."""
    try:
        with place_with_tests(account, "minictr-secrets-site-", ROOTLESS) as (runner, place,
                                                                              tests):
            # the token in the environment pytest starts with, as a CI runner's would be
            done = runner("-c", "import os, sys, pytest; os.environ['MY_API_TOKEN'] = "
                          "'do-not-leak'; sys.exit(pytest.main(sys.argv[1:]))",
                          "-p", "pytest_minictr.plugin", "-p", "no:cacheprovider", "-rA",
                          f"--basetemp={place}/home/tmp", str(tests), cwd=tests)
        assert "PASSED test_mine.py::test_rootless_body" in done.stdout, done.stdout[-3000:]
        assert "PASSED test_mine.py::test_after" in done.stdout, done.stdout[-3000:]
    finally:
        for path in Path("/tmp").glob("minictr-fixture-*"):
            if path.stat().st_uid == account.uid:
                shutil.rmtree(path)
