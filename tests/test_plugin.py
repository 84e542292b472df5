"""The pytest plugin as its users meet it: test files run by a real pytest (pytester, in a
subprocess), and the `container` fixture used right here on the real kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_minictr import RootfsBuilder

from .conftest import processes_with

pytest_plugins = ["pytester"]


@pytest.fixture
def run_tests(pytester, cache_dir):
    """pytest in a subprocess on the given test file, sharing this session's rootfs cache."""
    def run(source: str, *args: str):
        pytester.makepyfile(test_user=textwrap.dedent(source))
        return pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                             f"--minictr-cache-dir={cache_dir}", *args)
    return run


# --- registration -----------------------------------------------------------------------------

def test_marker_is_registered_with_its_keywords(pytester):
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.container(memory=*cpus=*pids=*timeout=*"
                                 "scope='test'): *scope= (test, module or session)*"])


@pytest.mark.needs_limits
def test_the_readme_example_passes_under_strict_markers(run_tests):
    result = run_tests('''
        import pytest

        @pytest.mark.container(memory="64M", cpus=0.5, pids=32, timeout=5, binaries=["sh", "seq"])
        def test_bounded(container):
            result = container.run(["sh", "-c", "seq 3"])
            assert result.returncode == 0
            assert result.stdout == b"1\\n2\\n3\\n"
    ''', "--strict-markers", "-W", "error::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=1)


@pytest.mark.needs_root
def test_report_header_says_what_this_host_does(run_tests):
    result = run_tests("def test_nothing(): pass")
    result.stdout.fnmatch_lines(["minictr 0.1.0: root, cgroups v* (limits), user namespaces "
                                 "yes, setup *, ready, rootfs built from host binaries, "
                                 "cache *"])


# --- the fixture ------------------------------------------------------------------------------

def test_commands_as_strings_lists_and_bare_names(container):
    assert container.run("echo $((6 * 7))").stdout == b"42\n"
    assert container.run(["echo", "list"]).stdout == b"list\n"
    assert container.run(["/bin/sh", "-c", "cat"], input=b"in").stdout == b"in"
    assert container.run("echo $GREETING", env={"GREETING": "hi"}).stdout == b"hi\n"


def test_writes_persist_within_a_test(container):
    container.run("echo kept > /etc/note; mkdir /work")
    assert container.run("cat /etc/note; ls -d /work").stdout == b"kept\n/work\n"
    assert not (container.rootfs / "etc/note").exists()


def test_writes_do_not_reach_the_next_test(container):
    assert container.run("cat /etc/note").returncode != 0


@pytest.mark.container(timeout=0.5, hostname="box")
def test_marker_settings_apply(container):
    assert container.run("hostname").stdout == b"box\n"
    assert container.run("sleep 5").timed_out
    assert not container.run("sleep 1", timeout=3).timed_out


@pytest.mark.container(capabilities=["net_raw"], rlimits={"nofile": (50, 60)}, seccomp=False)
def test_a_test_asks_for_more_by_name(container):
    status = container.run("cat /proc/self/status; ulimit -n; ulimit -Hn").stdout.decode()
    assert "CapEff:\t00000000000024fb" in status  # the default eight and NET_RAW
    assert "Seccomp:\t0" in status and status.endswith("50\n60\n")


@pytest.mark.needs_root
@pytest.mark.container(user=False)
def test_user_false_makes_container_root_host_root(container):
    assert container.run("cat /proc/self/uid_map").stdout.split() == [b"0", b"0", b"4294967295"]


@pytest.mark.needs_limits
@pytest.mark.container(recipe="python3", memory="64M")
def test_a_recipe_from_the_marker(container):
    result = container.run(["python3", "-c", "import sqlite3; print(sqlite3.sqlite_version)"])
    assert result.returncode == 0 and result.stdout.count(b".") == 2, result.stderr


@pytest.mark.needs_limits
@pytest.mark.container(memory="32M")
def test_limits_from_the_marker(container):
    result = container.run('a=x; while :; do a="$a$a"; done')
    assert result.oom_killed and result.returncode < 0


@pytest.mark.needs_limits
def test_markers_merge_closest_wins(run_tests):
    result = run_tests('''
        import pytest
        pytestmark = pytest.mark.container(memory="64M", pids=10, hostname="module")

        @pytest.mark.container(pids=20)
        class TestInside:
            @pytest.mark.container(hostname="function")
            def test_merged(self, container):
                s = container.settings
                assert (s.memory, s.pids, s.hostname) == (64 * 1024**2, 20, "function")
                assert container.run("hostname").stdout == b"function\\n"
    ''')
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("marker, message", [
    ("memroy='64M'", "unknown keyword 'memroy'"),
    ("scop='module'", "unknown keyword 'scop' (did you mean 'scope'?"),
    ("memory='64Q'", "memory='64Q': unknown unit 'Q'"),
    ("memory='1M'", "memory='1M': must be at least 4 MiB"),
    ("hostname='a b'", "hostname='a b'"),
    ("timeout=10**9", "timeout=1000000000: must be at most"),
    ("cpus='lots'", "cpus='lots'"),
    ("pids=0", "pids=0: expected a positive integer"),
    ("network='host'", "network='host'"),
    ("binaries='sh'", "binaries='sh': expected a list"),
    ("binaries=['no-such-binary-x']", "@pytest.mark.container: binary 'no-such-binary-x' not "
                                      "found on this host's PATH: install it, or give its path"),
    ("rootfs='/no/such/dir'", "rootfs='/no/such/dir': no such directory"),
    ("recipe='nonesuch'", "recipe='nonesuch': no such recipe"),
    ("'64M'", "takes keywords only"),
    ("user='no'", "user='no'"),
    ("seccomp=0", "seccomp=0: expected True or False"),
    ("allow_syscalls=['read']", "'read' is not a call the default seccomp filter denies"),
    ("capabilities=['CAP_EVERYTHING']", "'CAP_EVERYTHING' is not a capability"),
    ("rlimits={'files': 10}", "unknown limit 'files'"),
    ("rlimits={'nofile': (10, 5)}", "the soft limit exceeds the hard one"),
])
def test_bad_marker_fails_that_test_at_setup_naming_it(run_tests, marker, message):
    result = run_tests(f'''
        import pytest

        @pytest.mark.container({marker})
        def test_bad(container):
            pass

        def test_unaffected():
            pass
    ''')
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*{message}*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_a_missing_binary_leaves_the_hosts_path_out(run_tests):
    result = run_tests("""
        import pytest

        @pytest.mark.container(binaries=["no-such-binary-x"])
        def test_bad(container):
            pass
    """)
    result.assert_outcomes(errors=1)
    assert os.environ["PATH"] not in result.stdout.str()


# --- options ----------------------------------------------------------------------------------

PRINT_MEMORY = '''
    import pytest

    def test_default(container):
        print("memory", container.settings.memory)

    @pytest.mark.container(memory="8M")
    def test_marker(container):
        print("memory", container.settings.memory)
'''


def test_option_precedence_ini_env_command_line_marker(run_tests, pytester, monkeypatch):
    pytester.makeini("[pytest]\nminictr_memory = 16M\n")
    run_tests(PRINT_MEMORY, "-s").stdout.fnmatch_lines(["*memory 16777216*", "*memory 8388608*"])
    monkeypatch.setenv("MINICTR_MEMORY", "32M")
    run_tests(PRINT_MEMORY, "-s").stdout.fnmatch_lines(["*memory 33554432*", "*memory 8388608*"])
    run_tests(PRINT_MEMORY, "-s", "--minictr-memory=48M").stdout.fnmatch_lines(
        ["*memory 50331648*", "*memory 8388608*"])


def test_bad_option_is_a_usage_error(run_tests):
    result = run_tests("def test_x(): pass", "--minictr-memory=64Q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--minictr-memory='64Q': unknown unit 'Q'*"])


@pytest.mark.parametrize("make_dir, message", [(False, "no such directory"),
                                               (True, "the directory is empty")])
def test_missing_or_empty_prepared_rootfs_is_a_usage_error(run_tests, tmp_path, make_dir,
                                                           message):
    rootfs = tmp_path / "rootfs"
    if make_dir:
        rootfs.mkdir()
    result = run_tests("def test_x(): pass", f"--minictr-rootfs={rootfs}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--minictr-rootfs=*{message}*"])


def test_prepared_rootfs_is_the_base_of_every_container(run_tests, tmp_path):
    rootfs = RootfsBuilder().build(binaries=["sh", "cat"], dest=tmp_path / "prepared")
    (rootfs / "etc/prepared-here").write_text("yes\n")
    result = run_tests('''
        def test_uses_it(container):
            assert container.run("cat /etc/prepared-here").stdout == b"yes\\n"
    ''', f"--minictr-rootfs={rootfs}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*rootfs from {rootfs}*"])


# --- failures, unavailability, xdist --------------------------------------------------------

def test_a_failed_test_shows_its_last_container(run_tests):
    result = run_tests('''
        def test_fails(container):
            result = container.run("echo something broke >&2; exit 3")
            assert result.returncode == 0
    ''')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*minictr: last container*", "*returncode 3*",
                                 "*something broke*"])


UNAVAILABLE_CGROUPS = '''
    import pytest

    @pytest.mark.container(memory="64M")
    def test_needs_a_limit(container):
        container.run("true")

    def test_plain(container):
        assert container.run("echo fine").stdout == b"fine\\n"
'''


@pytest.mark.needs_root
@pytest.mark.parametrize("policy, outcomes", [(None, {"failed": 1, "passed": 1}),
                                              ("skip", {"skipped": 1, "passed": 1})])
def test_where_limits_cannot_be_had_fail_or_skip_with_the_reason(pytester, cache_dir, policy,
                                                                  outcomes):
    # a read-only cgroupfs (as inside most containers), in a mount namespace of its own
    pytester.makepyfile(test_user=textwrap.dedent(UNAVAILABLE_CGROUPS))
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
            f"--minictr-cache-dir={cache_dir}"] + ([f"--minictr-unavailable={policy}"]
                                                   if policy else [])
    script = ('for m in $(awk \'$9 ~ /^cgroup/ {print $5}\' /proc/self/mountinfo); do '
              'mount -o remount,bind,ro "$m"; done; exec "$@"')
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script, "sh", *args], cwd=pytester.path, capture_output=True,
                          text=True, timeout=120)
    summary = done.stdout.strip().splitlines()[-1]
    for outcome, count in outcomes.items():
        assert f"{count} {outcome}" in summary, done.stdout
    assert "minictr cannot run containers here" in done.stdout
    assert "read-only" in done.stdout


def test_xdist_workers_each_get_their_own_containers(run_tests):
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    result = run_tests('''
        import pytest

        @pytest.mark.parametrize("n", range(12))
        def test_same_path(container, n):
            container.run(f"mkdir -p /data; echo {n} > /data/value")
            assert container.run("cat /data/value").stdout == f"{n}\\n".encode()
    ''', "-n", "2")
    result.assert_outcomes(passed=12)


def test_ctrl_c_stops_running_containers_and_cleans_up(pytester, cache_dir, tmp_path):
    started = tmp_path / "started"
    pytester.makepyfile(test_user=textwrap.dedent(f'''
        from pathlib import Path

        def test_slow(container):
            Path({str(started)!r}).touch()
            container.run("sleep 3033.5")
    '''))
    pytest_run = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                                   f"--minictr-cache-dir={cache_dir}"], cwd=pytester.path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    launcher = _child_launcher(pytest_run.pid)
    pytest_run.send_signal(signal.SIGINT)
    output = pytest_run.communicate(timeout=60)[0].decode()
    assert pytest_run.returncode == pytest.ExitCode.INTERRUPTED, output
    assert not processes_with("3033.5")
    assert launcher is not None and not Path(f"/proc/{launcher}").exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/minictr/minictr-{launcher}@*"))


def _child_launcher(parent: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"launcher.server" in cmdline:
            return int(stat.parent.name)
    return None

