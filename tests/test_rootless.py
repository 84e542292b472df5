"""The runtime, the CLI, the plugin and the isolation tests as an unprivileged user: a user
namespace makes the container possible (a full id map where subordinate ids are granted), and
a limit that needs cgroups it may not create is refused with the reason and the fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_minictr import RootfsBuilder
from tests.helpers import (
    command_of,
    eventually,
    launcher_of,
    process_gone,
    skip_unless_others_reach_the_checkout,
)
from tests.unprivileged import SYSTEM_PYTHON, pytest_for, python_as, user_site

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534

SCRIPT = """
import sys
from pytest_minictr import ContainerRuntime, MinictrError
rootfs = sys.argv[1]
with ContainerRuntime() as runtime:
    result = runtime.run(rootfs, ["sh", "-c", "id -u; cat /proc/self/uid_map; echo w > /tmp/w"]
                         ).wait()
    print(result.returncode, *result.stdout.decode().split())
    try:
        runtime.run(rootfs, ["true"], memory_limit="64M")
    except MinictrError as error:
        print(type(error).__name__, error)
"""


@pytest.fixture(scope="module")
def world_readable_rootfs():
    place = tempfile.mkdtemp(prefix="minictr-rootless-")
    os.chmod(place, 0o755)
    try:
        yield RootfsBuilder(cache_dir=place).build(binaries=["sh", "id", "cat", "touch", "chown",
                                                             "tty", "ls"])
    finally:
        shutil.rmtree(place)


def run_as_nobody(rootfs: Path) -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to become an unprivileged user (setpriv)")
    for program in ("setpriv", SYSTEM_PYTHON):
        if not shutil.which(program):
            pytest.skip(f"{program} is not installed")
    skip_unless_others_reach_the_checkout()
    return run_as(NOBODY, SCRIPT, str(rootfs)).splitlines()



def run_as(uid: int, script: str, *args: str) -> str:
    """`script`, run by the system Python as the unprivileged `uid`; its stdout."""
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         SYSTEM_PYTHON, "-c", script, *args],
        env={"PYTHONPATH": str(REPO), "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_unprivileged_user_gets_a_container_with_root_inside(world_readable_rootfs):
    first, _ = run_as_nobody(world_readable_rootfs)
    # returncode, id -u inside, then the uid map: container 0 is our own uid outside
    assert first.split() == ["0", "0", "0", str(NOBODY), "1"]


FULL_MAP_SCRIPT = """
import sys
from pytest_minictr import ContainerRuntime
with ContainerRuntime() as runtime:
    result = runtime.run(sys.argv[1], ["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; "
                                       "touch /tmp/f && chown 1000:1000 /tmp/f && echo chowned"]
                         ).wait()
    print(result.returncode, result.stdout.decode(), result.stderr.decode())
"""
MAPPED_USER, MAPPED_UID = "www-data", 33  # a system user of Debian; only this test maps it
SUBORDINATE_START = 7_000_000


@pytest.fixture
def subordinate_ranges():
    """/etc/subuid and /etc/subgid ranges for MAPPED_USER, as `usermod --add-subuids` would
    give; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to grant subordinate ids")
    for helper in ("newuidmap", "newgidmap"):
        if not shutil.which(helper):
            pytest.skip(f"{helper} is not installed (Debian: uidmap)")
    try:
        import pwd
        if pwd.getpwnam(MAPPED_USER).pw_uid != MAPPED_UID:
            raise KeyError(MAPPED_USER)
    except KeyError:
        pytest.skip(f"no user {MAPPED_USER} with uid {MAPPED_UID} on this host")
    entry = f"{MAPPED_USER}:{SUBORDINATE_START}:65536\n"
    files = [Path("/etc/subuid"), Path("/etc/subgid")]
    saved = [f.read_text() if f.exists() else None for f in files]
    for file, text in zip(files, saved, strict=True):
        file.write_text((text or "") + entry)
    yield SUBORDINATE_START
    for file, text in zip(files, saved, strict=True):
        if text is None:
            file.unlink()
        else:
            file.write_text(text)


def test_subordinate_ranges_give_a_full_id_map(world_readable_rootfs, subordinate_ranges):
    out = run_as(MAPPED_UID, FULL_MAP_SCRIPT, str(world_readable_rootfs))
    words = out.split()
    start = str(subordinate_ranges)
    # uid map then gid map: 0 -> our own id, 1..65535 -> the subordinate range
    assert words == ["0", "0", str(MAPPED_UID), "1", "1", start, "65535",
                     "0", str(MAPPED_UID), "1", "1", start, "65535", "chowned"], out


TERMINAL_SCRIPT = """
import sys
from pytest_minictr.cli.main import main
sys.exit(main(["run", "-t", "--rootfs", sys.argv[1], "--", "sh", "-c",
               "tty; test -t 0 && echo on-a-tty; ls /dev/pts"]))
"""


def test_an_unprivileged_users_terminal_is_the_containers_own(world_readable_rootfs):
    """`run -t` without root: the container mounts its devpts in its user namespace and
    opens its pty there."""
    run_as_nobody(world_readable_rootfs)  # (skips where it cannot)
    assert run_as(NOBODY, TERMINAL_SCRIPT, str(world_readable_rootfs)).split() == [
        "/dev/pts/0", "on-a-tty", "0", "ptmx"]


def test_limits_without_cgroup_rights_say_why_and_what_to_do(world_readable_rootfs):
    _, second = run_as_nobody(world_readable_rootfs)
    assert second.startswith("UnsupportedError resource limits need cgroups:")
    assert "run as root" in second or "Delegate=yes" in second


DELEGATED_SCRIPT = """
import sys
from pytest_minictr import ContainerRuntime
with ContainerRuntime() as runtime:
    hog = runtime.run(sys.argv[1], ["sh", "-c", 'a=x; while :; do a="$a$a"; done'],
                      memory_limit="32M", timeout=60).wait()
    spin = runtime.run(sys.argv[1], ["sh", "-c", "while :; do :; done"], cpu_time_limit=1,
                       timeout=60).wait()
    print(hog.oom_killed, hog.returncode, spin.verdict, 1 <= spin.cpu_time <= 1.2)
"""


@pytest.fixture
def delegated_cgroup():
    """A cgroup handed to the unprivileged user as systemd's Delegate=yes would: the
    directory and its cgroup.procs, cgroup.subtree_control and cgroup.threads are theirs."""
    root = Path("/sys/fs/cgroup")
    controllers = (root / "cgroup.subtree_control")
    if os.geteuid() != 0 or not controllers.exists() or \
            "memory" not in controllers.read_text().split():
        pytest.skip("needs root on a pure cgroup v2 host with the memory controller "
                    "(ci/vm-tests runs this in a VM)")
    group = root / f"delegated-test-{os.getpid()}"
    group.mkdir()
    for path in (group, group / "cgroup.procs", group / "cgroup.subtree_control",
                 group / "cgroup.threads"):
        os.chown(path, NOBODY, NOBODY)
    yield group
    for child in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        (child / "cgroup.kill").write_text("1")
        child.rmdir()
    group.rmdir()


def test_limits_work_in_a_delegated_cgroup_v2_subtree(world_readable_rootfs, delegated_cgroup):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    done = subprocess.run(
        ["sh", "-c", f'echo $$ > {delegated_cgroup}/cgroup.procs && exec "$@"', "sh",
         "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         SYSTEM_PYTHON, "-c", DELEGATED_SCRIPT, str(world_readable_rootfs)],
        env={"PYTHONPATH": str(REPO), "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "-9", "cpu_time", "True"]


# --- the plugin, the CLI and the isolation tests, as the unprivileged user ----------------------

@pytest.fixture(scope="module")
def open_place():
    """A directory any user may enter, removed afterwards (pytest's own are 0700)."""
    place = tempfile.mkdtemp(prefix="minictr-rootless-site-")
    os.chmod(place, 0o755)
    yield Path(place)
    shutil.rmtree(place)


@pytest.fixture(scope="module")
def unprivileged_pytest(open_place):
    return pytest_for(NOBODY, open_place)


@pytest.fixture(scope="module")
def site_for_users(open_place):
    return user_site(open_place)


def test_the_isolation_and_exec_tests_pass_for_an_unprivileged_user(unprivileged_pytest,
                                                                     open_place):
    done = unprivileged_pytest("-m", "pytest", "-p", "pytest_minictr.plugin", "-p",
                               "no:cacheprovider", "-q", f"--basetemp={open_place}/home/tmp",
                               "tests/test_isolation.py", "tests/test_exec.py")
    assert done.returncode == 0, done.stdout[-3000:]
    summary = done.stdout.splitlines()[-1]
    assert "passed" in summary and "failed" not in summary, summary


def user_test_file(tests: Path) -> Path:
    """A directory any user may write, holding a user's test of a container."""
    tests.mkdir()
    (tests / "test_mine.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.container(hostname='mine')\n"
        "def test_mine(container):\n"
        "    container.run('echo kept > /data.txt')\n"
        "    assert container.run('id -u; hostname; cat /data.txt').stdout"
        " == b'0\\nmine\\nkept\\n'\n")
    os.chmod(tests, 0o777)
    return tests


def test_the_plugin_and_the_cli_for_an_unprivileged_user(unprivileged_pytest, open_place):
    tests = user_test_file(open_place / "user-tests")
    done = unprivileged_pytest("-m", "pytest", "-p", "pytest_minictr.plugin", "-p",
                               "no:cacheprovider", str(tests), cwd=tests)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "minictr 0.1.0: rootless, " in done.stdout and "1 passed" in done.stdout
    cli = unprivileged_pytest("-m", "pytest_minictr", "run", "--bin", "id", "--bin", "cat",
                              "--", "sh", "-c", "id -u; cat /proc/self/uid_map")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.split() == ["0", "0", str(NOBODY), "1"]


# --- real accounts: doctor, run and the plugin agree for any uid --------------------------------

ACCOUNT_SUBORDINATE_START = 8_000_000


@dataclass(frozen=True)
class Account:
    """Someone the tests become: a uid that is not the overflow id 65534, so a rehearsal that
    read its ids after unsharing (when they read as 65534) would be caught."""

    uid: int
    gid: int
    home: Path
    ranges: bool


def useradd(name: str) -> tuple[int, int]:
    """The new account's uid and gid: its own group's id may differ from its uid (a group
    left by another account, as the VM's run had one)."""
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", name],
                   check=True, capture_output=True, timeout=60)
    import pwd
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture(scope="module", params=["an account", "an account with subordinate ids",
                                        "a uid without an account"])
def account(request, open_place):
    """A real account made with useradd for these tests (its own group, a home, a passwd
    entry), with or without /etc/subuid and /etc/subgid ranges; or a bare uid that names no
    one. The ranges useradd may grant are replaced by ours (or none); all is undone after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create accounts")
    if request.param != "a uid without an account" and not shutil.which("useradd"):
        pytest.skip("useradd is not installed (Debian: passwd)")
    files = [Path("/etc/subuid"), Path("/etc/subgid")]
    saved = [f.read_text() if f.exists() else None for f in files]
    name = f"minictr-t{os.getpid()}"
    ranges = request.param == "an account with subordinate ids"
    if request.param == "a uid without an account":
        uid, home = 4242 + os.getpid() % 1000, open_place / f"home-{request.param_index}"
        gid = uid
        home.mkdir()
        os.chown(home, uid, uid)
    else:
        (uid, gid), home = useradd(name), Path("/home") / name
    if ranges:
        for file in files:
            if not shutil.which(f"new{file.name[3:]}map"):
                pytest.skip(f"new{file.name[3:]}map is not installed (Debian: uidmap)")
    for file, text in zip(files, saved, strict=True):
        kept = [line for line in (text or "").splitlines(keepends=True)
                if not line.startswith(f"{name}:")]
        if ranges:
            kept.append(f"{name}:{ACCOUNT_SUBORDINATE_START}:65536\n")
        file.write_text("".join(kept))
    yield Account(uid, gid, home, ranges)
    if request.param != "a uid without an account":
        subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)
    for file, text in zip(files, saved, strict=True):
        if text is None:
            file.unlink(missing_ok=True)
        else:
            file.write_text(text)


def test_a_user_inside_is_mapped_or_refused_for_a_real_account(account, site_for_users):
    as_account = python_as(account.uid, account.gid, account.home, site_for_users)
    run = as_account("-m", "pytest_minictr", "run", "--bin", "id", "-u", "1000:1000", "--",
                     "sh", "-c", "id -u; id -g")
    if account.ranges:  # container ids 1-65535 are its subordinate ids
        assert (run.returncode, run.stdout.split()) == (0, ["1000", "1000"]), run.stderr
    else:
        assert run.returncode == 125 and run.stderr == (
            "minictr: error: run_as='1000:1000': uid 1000 is not mapped in the container's user "
            "namespace (without subordinate ids only container root, 0, is: newuidmap and "
            "newgidmap with ranges of yours in /etc/subuid and /etc/subgid map 1-65535; see "
            "`minictr doctor`)\n"), run.stderr
    root = as_account("-m", "pytest_minictr", "run", "--bin", "id", "-u", "0", "--", "id", "-u")
    assert (root.returncode, root.stdout) == (0, "0\n"), root.stderr
    if account.ranges:  # the switch disarmed the init's parent death signal: armed again
        started = as_account("-m", "pytest_minictr", "run", "-d", "--bin", "sleep", "-u",
                             "1000", "--", "sleep", "600")
        cid = started.stdout.strip()
        try:
            init = json.loads(as_account("-m", "pytest_minictr", "inspect", cid).stdout)[0]
            assert eventually(lambda: command_of(init["init_pid"]) is not None)
            os.kill(launcher_of(init["init_pid"]), signal.SIGKILL)
            assert eventually(lambda: process_gone(init["init_pid"]))
        finally:
            as_account("-m", "pytest_minictr", "rm", "-f", cid)
            shutil.rmtree(Path(tempfile.gettempdir(), f"minictr-{account.uid}"),
                          ignore_errors=True)  # its state directory: no XDG_RUNTIME_DIR


def test_doctor_run_and_the_plugin_agree_for_a_real_account(account, site_for_users):
    as_account = python_as(account.uid, account.gid, account.home, site_for_users)
    doctor = as_account("-m", "pytest_minictr", "doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {check["name"]: check for check in json.loads(doctor.stdout)["checks"]}
    assert checks["user namespaces"]["ok"], checks["user namespaces"]
    assert checks["id mapping"]["ok"] is account.ranges, checks["id mapping"]

    run = as_account("-m", "pytest_minictr", "run", "--bin", "id", "--bin", "cat", "--",
                     "sh", "-c", "id -u; cat /proc/self/uid_map")
    assert run.returncode == 0, run.stderr
    full = ["1", str(ACCOUNT_SUBORDINATE_START), "65535"] if account.ranges else []
    assert run.stdout.split() == ["0", "0", str(account.uid), "1", *full]

    tests = user_test_file(account.home / "tests")
    plugin = as_account("-m", "pytest", "-p", "pytest_minictr.plugin", "-p", "no:cacheprovider",
                        str(tests), cwd=tests)
    assert plugin.returncode == 0, plugin.stdout[-3000:]
    header = next(line for line in plugin.stdout.splitlines() if line.startswith("minictr "))
    assert "rootless, " in header and "user namespaces yes, " in header, header
    assert header.endswith("ready") or ", ready," in header, header
    assert "1 passed" in plugin.stdout
