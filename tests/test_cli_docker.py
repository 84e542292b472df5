"""`minictr run` as a Docker user types it: -v, --mount, --read-only, -e NAME, --env-file, -w,
--version, the default rootfs, Docker's exit codes, one stderr line for each end the user did
not ask for, and `--json` that always answers in JSON. Bad input to each new flag: one line,
status 125, nothing left behind."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_minictr import ContainerRuntime
from pytest_minictr.cli.docker_flags import env_file, mount_option, volume_mount
from pytest_minictr.errors import ConfigError
from pytest_minictr.spec import Mount

from .helpers import command_of, eventually, launcher_of, process_gone

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("no_leftovers")
REPO = Path(__file__).resolve().parent.parent


def minictr(*args: str, input: bytes | None = None, env: dict | None = None, cache_dir=None):
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if cache_dir is not None:
        environment["MINICTR_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "pytest_minictr", *args], input=input,
                          capture_output=True, env=environment, timeout=120)


def test_version_names_the_package_the_setup_path_the_cgroups_and_the_kernel():
    done = minictr("--version")
    assert done.returncode == 0, done.stderr
    line = done.stdout.decode()
    from pytest_minictr.native import setup_path
    assert line.startswith("minictr 0.") and f"setup: {setup_path().path.value}" in line
    assert "cgroups: " in line and f"kernel: {platform.release()}" in line


def test_the_default_rootfs_holds_sh_and_the_usual_coreutils(cache_dir):
    done = minictr("run", "--", "sh", "-c", "sleep 0.01; echo a > /tmp/f; cat /tmp/f; "
                   "ls / | head -1; wc -l < /tmp/f", cache_dir=cache_dir)
    assert (done.returncode, done.stdout) == (0, b"a\nbin\n1\n"), done.stderr


def test_bind_and_tmpfs_mounts_as_docker_spells_them(tmp_path, cache_dir):
    (tmp_path / "rw").mkdir(mode=0o777)  # container root is an unprivileged host uid
    os.chmod(tmp_path / "rw", 0o777)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "in").write_text("kept\n")
    done = minictr("run", "-v", f"{tmp_path / 'rw'}:/data", "-v", f"{tmp_path / 'ro'}:/in:ro",
                   "--mount", "type=tmpfs,target=/scratch,tmpfs-size=1M",
                   "--mount", f"type=bind,source={tmp_path / 'ro'},target=/again,readonly",
                   "--", "sh", "-c", "echo out > /data/f; cat /in/in; echo x > /in/y || echo "
                   "ro; echo x > /again/y || echo ro2; echo s > /scratch/s && cat /scratch/s",
                   cache_dir=cache_dir)
    assert done.stdout == b"kept\nro\nro2\ns\n", done.stderr
    assert (tmp_path / "rw" / "f").read_text() == "out\n"
    assert not (tmp_path / "ro" / "y").exists()


def test_read_only_root_keeps_tmp_writable(cache_dir):
    done = minictr("run", "--read-only", "--", "sh", "-c",
                   "touch /x 2>/dev/null || echo refused; touch /tmp/y && echo tmp",
                   cache_dir=cache_dir)
    assert done.stdout == b"refused\ntmp\n", done.stderr


def test_read_only_in_the_library(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", "touch /x; echo $?"], read_only=True).wait()
    assert result.stdout == b"1\n" and b"Read-only file system" in result.stderr


def test_environment_from_the_host_from_a_file_and_w_for_cwd(tmp_path, cache_dir):
    listed = tmp_path / "env"
    listed.write_text("# comment\n\nFROM_FILE=file\nBOTH=file\nFROM_HOST_TOO\n")
    done = minictr("run", "-e", "FROM_HOST", "-e", "BOTH=flag", "-e", "UNSET_ON_HOST",
                   "--env-file", str(listed), "-w", "/tmp", "--", "sh", "-c",
                   'echo "$FROM_HOST $FROM_FILE $BOTH $FROM_HOST_TOO ${UNSET_ON_HOST-unset} '
                   '$PWD"', env={"FROM_HOST": "host", "FROM_HOST_TOO": "too"},
                   cache_dir=cache_dir)
    assert done.stdout == b"host file flag too unset /tmp\n", done.stderr


@pytest.mark.parametrize("args, message", [
    (["-v", "relative:/data"], b"-v 'relative:/data': 'relative' is not an absolute host path"),
    (["-v", "/tmp"], b"-v '/tmp': expected HOST:CONTAINER[:MODE], MODE one of ro, rw"),
    (["-v", "/tmp:/x:rx"], b"mode 'rx' is not supported: the modes are ro and rw"),
    (["-v", "/tmp:/x:z"], b"-v '/tmp:/x:z': mode 'z' is not supported: the modes are ro and rw"),
    (["-v", "/no/such/dir:/x"], b"mount source '/no/such/dir': does not exist on the host"),
    (["-v", "/tmp:/proc/x"], b"is inside /proc"),
    (["--mount", "type=volume,target=/x"], b"type=volume is not supported"),
    (["--mount", "type=bind,source=/tmp"], b"target= is missing"),
    (["--mount", "type=bind,source=/tmp,target=/x,z=1"], b"unknown key 'z'"),
    (["--mount", "type=bind,source=/tmp,target=/x,readonly=maybe"], b"readonly=maybe"),
    (["--mount", "type=tmpfs,target=/x,tmpfs-size=lots"], b"tmpfs-size='lots'"),
    (["--env-file", "/no/such/file"], b"--env-file '/no/such/file': No such file"),
    (["-e", "1BAD"], b"--env='1BAD': expected NAME=VALUE or NAME"),
    (["-w", "relative"], b"--cwd='relative'"),
    (["--name", "bad name", "-d"], b"--name 'bad name': expected letters"),
    (["-t", "-d"], b"-t with -d: minictr cannot attach"),
    (["--read-only=yes"], b"ignored explicit argument 'yes'"),
    (["--rootfs", "/etc/passwd"], b"--rootfs '/etc/passwd': is not a directory"),
])
def test_bad_input_to_each_new_flag_is_one_line_and_125(args, message, cache_dir):
    done = minictr("run", *args, "--", "true", cache_dir=cache_dir)
    assert done.returncode == 125, done
    assert done.stderr.startswith(b"minictr: error: ") and message in done.stderr, done.stderr
    assert done.stderr.count(b"\n") == 1 and done.stdout == b""


def test_a_bad_env_file_line_is_named(tmp_path, cache_dir):
    listed = tmp_path / "env"
    listed.write_text("GOOD=1\nnot a line\n")
    done = minictr("run", "--env-file", str(listed), "--", "true", cache_dir=cache_dir)
    assert done.returncode == 125 and b"line 2: 'not a line'" in done.stderr


@pytest.mark.parametrize("command, status, message", [
    (["/etc/passwd"], 126, b"'/etc/passwd' is not executable"),
    (["/etc"], 126, b"'/etc' is a directory"),
    (["/no/such/program"], 127, b"'/no/such/program': no such file on this host"),
    (["no-such-command-anywhere"], 127, b"not found on this host's PATH"),
])
def test_commands_that_cannot_run_exit_126_or_127_as_in_a_shell(command, status, message,
                                                                 cache_dir):
    done = minictr("run", "--", *command, cache_dir=cache_dir)
    assert (done.returncode, done.stderr.count(b"\n")) == (status, 1) and message in done.stderr


def test_usage_errors_exit_125_and_json_is_always_one_object(cache_dir):
    assert minictr().returncode == 125
    for args in (["run", "--json", "--"], ["run", "--json", "--memory", "64Q", "--", "true"],
                 ["run", "--json", "--bogus", "--", "true"]):
        done = minictr(*args, cache_dir=cache_dir)
        answer = json.loads(done.stdout)
        assert done.returncode == 125 and answer["returncode"] == 125 and answer["error"]
    ran = json.loads(minictr("run", "--json", "--", "sh", "-c", "exit 3",
                             cache_dir=cache_dir).stdout)
    assert (ran["returncode"], ran["verdict"]) == (3, "runtime_error") and "error" not in ran


def test_ends_the_user_did_not_ask_for_get_one_line(cache_dir):
    timed = minictr("run", "--timeout", "0.3", "--", "sleep", "5", cache_dir=cache_dir)
    assert timed.returncode == 137 and timed.stderr == b"minictr: timed out after 0.3 s (killed)\n"
    signalled = minictr("run", "--", "sh", "-c", "kill -SEGV $$", cache_dir=cache_dir)
    assert signalled.returncode == 139
    assert signalled.stderr == b"minictr: the command was killed by SIGSEGV\n"
    ordinary = minictr("run", "--", "sh", "-c", "exit 5", cache_dir=cache_dir)
    assert (ordinary.returncode, ordinary.stderr) == (5, b"")


def test_a_reader_that_went_away_is_not_an_end_to_report(cache_dir):
    """`minictr run -- seq 1 100000 | head -1`: seq dies of SIGPIPE once head has gone; the
    user asked for that, so no line, and the shell's status (141) as Docker gives it."""
    done = subprocess.run(
        ["bash", "-c", f'set -o pipefail; "{sys.executable}" -m pytest_minictr run -- '
                       "seq 1 100000 | head -1"],
        capture_output=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "MINICTR_CACHE_DIR": str(cache_dir)})
    assert (done.returncode, done.stdout, done.stderr) == (141, b"1\n", b"")
    # a SIGPIPE while our output is still read was no one's wish: it is reported
    inside = minictr("run", "--", "sh", "-c", "kill -PIPE $$", cache_dir=cache_dir)
    assert (inside.returncode, inside.stderr) == (
        141, b"minictr: the command was killed by SIGPIPE\n")


def test_run_json_into_a_pipe_nobody_reads_exits_quietly(cache_dir):
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "pytest_minictr", "run", "--json", "--",
                               "true"], stdout=stdout, stderr=subprocess.PIPE, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO),
                                   "MINICTR_CACHE_DIR": str(cache_dir)})
    assert (done.returncode, done.stderr) == (141, b"")


@pytest.mark.parametrize("native", ["1", "0"])
def test_user_runs_the_command_and_its_init_as_that_uid_without_capabilities(native,
                                                                             cache_dir):
    done = minictr("run", "-u", "1000:1001", "--", "sh", "-c",
                   "id -u; id -g; id -G; grep -E '^(Uid|CapEff)' /proc/self/status /proc/1/status;"
                   " touch /tmp/mine && echo wrote; touch /etc/x || echo refused",
                   env={"MINICTR_NATIVE": native}, cache_dir=cache_dir)
    assert done.stdout.decode().split() == [
        "1000", "1001", "1001", "/proc/self/status:Uid:", *["1000"] * 4,
        "/proc/self/status:CapEff:", "0000000000000000",
        "/proc/1/status:Uid:", *["1000"] * 4, "/proc/1/status:CapEff:", "0000000000000000",
        "wrote", "refused"], done.stderr
    assert minictr("run", "--user", "7", "--", "id", "-g", cache_dir=cache_dir,
                   env={"MINICTR_NATIVE": native}).stdout == b"0\n"  # Docker's gid: 0


def test_user_ids_must_be_numbers_and_mapped(cache_dir):
    for user in ("nobody", "1000:", "-1", "4294967295"):
        named = minictr("run", "-u", user, "--", "true", cache_dir=cache_dir)
        assert named.returncode == 125 and b"expected UID[:GID] as numbers" in named.stderr
    unmapped = minictr("run", "-u", "1000:70000", "--", "true", cache_dir=cache_dir)
    assert unmapped.returncode == 125 and unmapped.stderr == (
        b"minictr: error: run_as='1000:70000': gid 70000 is not mapped in the container's "
        b"user namespace (container ids 0-65535 are)\n")


@pytest.mark.needs_root  # --no-userns: the host's own ids
def test_user_without_a_user_namespace_is_that_host_uid(cache_dir):
    done = minictr("run", "--no-userns", "-u", "70000:70000", "--", "sh", "-c",
                   "id -u; cat /proc/self/uid_map", cache_dir=cache_dir)
    assert done.stdout.split() == [b"70000", b"0", b"0", b"4294967295"], done.stderr


def test_the_library_takes_run_as(runtime, rootfs):
    result = runtime.run(rootfs, ["id", "-u"], run_as=(33, 33)).wait()
    assert (result.returncode, result.stdout) == (0, b"33\n"), result.stderr
    with pytest.raises(ConfigError, match="run_as=True: expected UID"):
        runtime.run(rootfs, ["true"], run_as=True)


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_run_as_container_dies_with_its_launcher(rootfs, monkeypatch, native):
    """Leaving uid 0 disarms the parent death signal (a kernel rule): armed again after the
    switch, a killed launcher takes the container with it at once."""
    monkeypatch.setenv("MINICTR_NATIVE", native)  # the launcher started below reads it
    runtime = ContainerRuntime()
    container = runtime.run(rootfs, ["sleep", "600"], run_as=1000)
    try:
        assert eventually(lambda: command_of(container.pid) is not None)  # past the switch
        os.kill(launcher_of(container.pid), signal.SIGKILL)
        # (nothing calls the runtime meanwhile: a new launcher reaps a dead one's cgroups)
        assert eventually(lambda: process_gone(container.pid), timeout=5)
    finally:
        if not process_gone(container.pid):
            os.kill(container.pid, signal.SIGKILL)
        runtime.close()


@pytest.mark.needs_limits
def test_an_oom_kill_names_the_limit_and_the_peak(cache_dir):
    done = minictr("run", "--memory", "16M", "--", "sh", "-c",
                   "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived",
                   cache_dir=cache_dir)
    if b"OOM" not in done.stderr and done.returncode == 0:
        pytest.skip("this host enforces no memory limit (no memory cgroup)")
    assert done.returncode == 137, done.stderr
    assert done.stderr.startswith(b"minictr: killed by the OOM killer: memory limit 16.0M, "
                                  b"peak "), done.stderr


# --- the flags' parsing, as pure logic ----------------------------------------------------------

def test_volume_and_mount_texts_map_onto_the_librarys_mounts():
    assert volume_mount("/a:/b") == Mount("/b", "/a", read_only=False)
    assert volume_mount("/a:/b:ro") == Mount("/b", "/a", read_only=True)
    assert mount_option("type=bind,src=/a,dst=/b,ro") == Mount("/b", "/a", read_only=True)
    assert mount_option("type=bind,source=/a,target=/b,readonly=false") == \
        Mount("/b", "/a", read_only=False)
    assert mount_option("type=tmpfs,destination=/t,tmpfs-size=1M") == Mount.tmpfs("/t", "1M")


def test_env_file_takes_names_alone_from_the_host(tmp_path, monkeypatch):
    monkeypatch.setenv("ON_HOST", "h")
    monkeypatch.delenv("NOT_ON_HOST", raising=False)
    listed = tmp_path / "env"
    listed.write_text("A=1=2\nON_HOST\nNOT_ON_HOST\n  # indented comment\n")
    assert env_file(str(listed)) == {"A": "1=2", "ON_HOST": "h"}
    with pytest.raises(ConfigError, match="line 1"):
        listed.write_text("=x\n")
        env_file(str(listed))


def test_the_package_declares_its_license_as_an_spdx_expression():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")  # novermin
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "GPL-3.0-or-later" and project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])


def test_a_read_only_marker_and_library_keyword_are_declared_once():
    from pytest_minictr.keywords import BY_NAME, MARKER_KEYWORDS
    keyword = BY_NAME["read_only"]
    assert keyword.library == "read_only" and "read_only" in MARKER_KEYWORDS
    assert keyword.flag.names == ("--read-only",)
    with ContainerRuntime() as runtime, pytest.raises(ConfigError, match="read_only='yes'"):
        runtime.run("/", ["true"], read_only="yes")


def test_the_readmes_command_line_examples_run(tmp_path, cache_dir):
    """The README's `For example:` block as a script (the `-it` lines want a person)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("For example:\n\n```sh\n"):].split("```")[1].split("\n", 1)[1]
    script = "\n".join(line for line in block.splitlines() if " -it " not in line)
    done = subprocess.run(
        ["bash", "-c", f'minictr() {{ "{sys.executable}" -m pytest_minictr "$@"; }}\n{script}'],
        capture_output=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "MINICTR_CACHE_DIR": str(cache_dir),
             "MINICTR_STATE_DIR": str(tmp_path / "state")})
    assert done.returncode == 0, done.stderr
    assert b"killed by the OOM killer" in done.stderr or b"memory" not in done.stderr
    assert b"Z " in done.stdout and done.stdout.endswith(b"\n0\n")  # timestamped, then wait


# --- the same words in the plugin ---------------------------------------------------------------

READ_ONLY_TESTS = '''
import pytest

@pytest.mark.container(read_only=True)
def test_read_only(container):
    done = container.run(["sh", "-c", "touch /x || echo refused; touch /tmp/y && echo tmp"])
    assert done.stdout == b"refused\\ntmp\\n", done.stderr
'''


def test_the_read_only_marker(pytester, cache_dir):
    pytester.makepyfile(test_marker=READ_ONLY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("where, named", [
    ("marker", "@pytest.mark.container: memory='64Q': unknown unit 'Q'"),
    ("environment", "environment variable MINICTR_MEMORY='64Q': unknown unit 'Q'"),
    ("ini", "ini key minictr_memory='64Q': unknown unit 'Q'"),
])
def test_plugin_errors_name_the_value_where_the_user_wrote_it(pytester, monkeypatch, cache_dir,
                                                              where, named):
    marker = "@pytest.mark.container(memory='64Q')\n" if where == "marker" else ""
    pytester.makepyfile(test_words=f"import pytest\n{marker}def test_x(container): pass\n")
    if where == "environment":
        monkeypatch.setenv("MINICTR_MEMORY", "64Q")
    if where == "ini":
        pytester.makeini("[pytest]\nminictr_memory = 64Q\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--minictr-cache-dir={cache_dir}")
    assert named in result.stdout.str() + result.stderr.str()
