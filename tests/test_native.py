"""The native core (`minictr-init`, issue #17) and the choice between it and pure Python: one
plan drives both, nothing inside a container names a host path, the switch works."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from pytest_minictr import (
    CommandNotFoundError,
    ContainerRuntime,
    ContainerSetupError,
    RootfsBuilder,
)
from pytest_minictr.container import body_plan, executor, plan
from pytest_minictr.native import PROGRAM, SWITCH, SetupPath, setup_path, why_it_cannot_run
from pytest_minictr.spec import Mount

native_only = pytest.mark.skipif(
    setup_path().path is not SetupPath.NATIVE,
    reason=f"the native core is not in use here ({setup_path()})")


def native_actions() -> set[str]:
    listed = subprocess.run([PROGRAM, "actions"], capture_output=True, check=True, timeout=10)
    return set(listed.stdout.decode().split())


@pytest.mark.skipif(not os.access(PROGRAM, os.X_OK), reason="the native core was not built")
def test_every_action_of_the_plan_vocabulary_exists_natively():
    # a sandboxed test body's own steps run in the worker's fork, in Python only
    assert native_actions() == python_actions() - body_plan.BODY_ONLY_ACTIONS


def python_actions() -> set[str]:
    return set(executor.Executor().actions)


def test_plans_name_only_actions_both_executors_know(rootfs):
    from pytest_minictr.keywords import make_spec
    spec = make_spec(rootfs, ["true"], mounts=[Mount.tmpfs("/scratch")])
    wheres = (plan.Where(cgroup_procs=("/x/cgroup.procs",), userns_fd=5, host_ids=(1, 1)),
              plan.Where(rootless=True), plan.Where(rootless=True, id_maps=(3, 4)))
    steps = [step for where in wheres for step in plan.setup_plan(spec, where)]
    steps += plan.exec_plan(spec, wheres[0], (3, None, None, None, None, None, 4))
    assert {step.action for step in steps} <= python_actions()


def test_the_switch_and_the_build_decide_the_path(monkeypatch):
    monkeypatch.setenv(SWITCH, "0")
    assert setup_path().path is SetupPath.PYTHON and SWITCH in setup_path().reason
    monkeypatch.delenv(SWITCH)
    runs = os.access(PROGRAM, os.X_OK) and why_it_cannot_run(PROGRAM) is None
    expected = SetupPath.NATIVE if runs else SetupPath.PYTHON
    assert setup_path().path is expected


@pytest.mark.skipif(not os.environ.get("CI"), reason="in CI only: elsewhere the pure Python "
                    "path is a user's lot where the build failed")
def test_in_ci_the_native_core_was_built_wherever_a_compiler_is():
    # the core is an optional extension: a core that fails to compile installs nothing, and
    # every test of the native path would skip
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if os.environ.get(SWITCH) == "0":
        pytest.skip(f"{SWITCH}=0")
    if not shutil.which(compiler):
        pytest.skip(f"no C compiler ({compiler})")
    assert setup_path().path is SetupPath.NATIVE, setup_path().reason


def test_a_core_the_loader_refuses_leaves_the_python_path_and_says_why(tmp_path, monkeypatch):
    # as a core linked against a newer C library than the host's is refused by ld.so
    monkeypatch.delenv(SWITCH, raising=False)
    program = tmp_path / "minictr-init"
    program.write_text("#!/bin/sh\necho \"minictr-init: version 'GLIBC_2.99' not found\" >&2\n"
                       "exit 1\n")
    program.chmod(0o755)
    choice = setup_path(str(program))
    assert choice.path is SetupPath.PYTHON
    assert "cannot run on this host" in choice.reason and "GLIBC_2.99" in choice.reason


def inspect_pid_1(runtime, rootfs) -> dict[str, str]:
    """What a command sees of its PID 1, with SYS_PTRACE as host root: the most insight an
    attacker inside could have (without it, /proc/1 is closed: not dumpable)."""
    seen = {}
    for name, command in (("cmdline", ["cat", "/proc/1/cmdline"]),
                          ("environ", ["cat", "/proc/1/environ"]),
                          ("exe", ["readlink", "/proc/1/exe"]),
                          ("mountinfo", ["cat", "/proc/1/mountinfo"])):
        result = runtime.run(rootfs, command, user=False, capabilities=["SYS_PTRACE"]).wait()
        assert result.returncode == 0, (name, result.stderr)
        seen[name] = result.stdout.decode().replace("\0", " ").strip()
    return seen


@native_only
@pytest.mark.needs_root
def test_nothing_of_pid_1_names_a_host_path(runtime, rootfs, tmp_path):
    seen = inspect_pid_1(runtime, rootfs)
    assert seen["exe"] == "/memfd:minictr-init (deleted)"
    assert seen["cmdline"].split()[0] == "minictr-init"
    assert seen["environ"] == ""
    host_paths = {sys.prefix, sys.executable, os.path.dirname(PROGRAM), str(rootfs),
                  str(tmp_path.parent), os.getcwd()}
    for name, text in seen.items():
        for path in host_paths:
            assert path not in text, (name, path, text)
    assert "/oldroot" not in seen["mountinfo"] and "python" not in seen["cmdline"]


def test_pid_1_is_named_minictr_init_where_ps_looks(runtime, cache_dir):
    # the kernel names a program exec'd through /proc/self/fd/N after the fd: "9"; the Python
    # path's init is a fork of the launcher: "python3"
    if not shutil.which("ps"):
        pytest.skip("no ps on this host (Debian: procps)")
    image = RootfsBuilder(cache_dir=cache_dir).build(binaries=["ps", "cat"])
    comm = runtime.run(image, ["cat", "/proc/1/comm"]).wait()
    assert comm.stdout == b"minictr-init\n", comm.stderr
    shown = runtime.run(image, ["ps", "-o", "pid=,comm=,args=", "-p", "1"]).wait()
    expected = ["1", "minictr-init"]
    if setup_path().path is SetupPath.NATIVE:  # (the Python init's argv is the launcher's)
        expected.append("minictr-init")
    assert shown.stdout.decode().split()[:len(expected)] == expected, shown


@native_only
@pytest.mark.needs_root
def test_a_killed_native_zygote_is_replaced_by_another(rootfs):
    import signal
    with ContainerRuntime() as runtime:
        runtime.run(rootfs, ["true"]).wait()
        launcher = runtime._client.pid
        zygote = next(pid for pid in (int(name) for name in os.listdir("/proc")
                                      if name.isdigit())
                      if _parent_of(pid) == launcher and _command_of(pid) == b"zygote"
                      and _pid_namespace(pid) == _pid_namespace(launcher))  # not a spare
        os.kill(zygote, signal.SIGKILL)
        # started back to back, past the spares made before: the launcher finds the zygote
        # gone while a container waits for its spare, and asks the new one
        started = [runtime.run(rootfs, ["readlink", "/proc/1/exe"], user=False,
                               capabilities=["SYS_PTRACE"]) for _ in range(8)]
        for container in started:
            assert container.wait().stdout == b"/memfd:minictr-init (deleted)\n"


def _pid_namespace(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def _command_of(pid: int) -> bytes:
    """The zygote's (and its spares') role, as their command line says ("zygote")."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            arguments = cmdline.read().split(b"\0")
    except OSError:
        return b""
    return arguments[1] if arguments[0] == b"minictr-init" else b""


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


@pytest.mark.needs_root
def test_the_pure_python_path_runs_with_the_switch(rootfs, monkeypatch):
    monkeypatch.setenv(SWITCH, "0")
    with ContainerRuntime() as fallback:
        seen = inspect_pid_1(fallback, rootfs)
        assert "minictr-init" not in seen["exe"]
        assert fallback.run(rootfs, ["sh", "-c", "exit 3"]).wait().returncode == 3


@pytest.mark.parametrize("switch", ["1", "0"])
def test_device_binds_are_nosuid_and_noexec_on_both_paths(rootfs, monkeypatch, switch):
    monkeypatch.setenv(SWITCH, switch)
    with ContainerRuntime() as runtime:
        result = runtime.run(rootfs, ["grep", " /dev/null ", "/proc/self/mountinfo"]).wait()
    options = result.stdout.decode().split()[5].split(",")
    assert "nosuid" in options and "noexec" in options and "nodev" not in options


@pytest.mark.parametrize("switch", ["1", "0"])
def test_a_failed_step_is_named_with_its_errno_on_both_paths(monkeypatch, switch, tmp_path):
    from pytest_minictr import RootfsBuilder
    image = RootfsBuilder().build(binaries=["true"], dest=tmp_path / "image")
    (image / "data").symlink_to(tmp_path / "host-side")
    monkeypatch.setenv(SWITCH, switch)
    with ContainerRuntime() as runtime:
        with pytest.raises(ContainerSetupError,
                           match="/data is a symlink in the rootfs") as failed:
            runtime.run(image, ["true"], mounts=[Mount.tmpfs("/data/x")]).wait()
        with pytest.raises(CommandNotFoundError, match="'nosuch' not found in the container"):
            runtime.run(image, ["nosuch"]).wait()
    assert (failed.value.step, failed.value.errno) == ("mount on /data/x", errno.ELOOP)
