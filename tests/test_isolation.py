"""What a command sees from inside a container, observed on the real kernel. The module also
runs as an unprivileged user (tests/test_rootless.py): tests that only root can make are
marked so."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from pytest_minictr import RootfsBuilder
from pytest_minictr.spec import DEFAULT_PATH

pytestmark = pytest.mark.usefixtures("no_leftovers")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can set this test up")


def run(runtime, rootfs, script: str, **kwargs):
    result = runtime.run(rootfs, ["sh", "-c", script], **kwargs).wait()
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def test_pid_namespace_shows_only_the_container(runtime, rootfs):
    out = run(runtime, rootfs, "echo $$; ls /proc")
    shell_pid, *entries = out.split()
    pids = {int(entry) for entry in entries if entry.isdigit()}
    assert shell_pid == "2"  # PID 1 is the container's init, the command its first child
    assert pids <= {1, 2, 3, 4, 5}, pids  # init, sh, ls and nothing of the host's


def test_hostname_is_the_containers_own(runtime, rootfs):
    assert run(runtime, rootfs, "hostname", hostname="box-1") == "box-1\n"
    # by default root inside may not change it (like Docker: no CAP_SYS_ADMIN)
    assert "must be root" in run(runtime, rootfs, "hostname changed-inside 2>&1; true")


@needs_root
def test_a_hostname_changed_inside_stays_inside(runtime, rootfs):
    run(runtime, rootfs, "hostname changed-inside", user=False, capabilities=["SYS_ADMIN"])
    assert socket.gethostname() != "changed-inside"


@pytest.mark.parametrize("network, lo_up", [("none", False), ("loopback", True)])
def test_network_namespace_has_only_loopback(runtime, rootfs, network, lo_up):
    # (the spare brings lo up ahead; "none" must still look like a fresh namespace)
    out = run(runtime, rootfs, "cat /proc/net/dev; echo ---; cat /proc/net/fib_trie; echo ---;"
              " cat /proc/net/if_inet6 2>/dev/null", network=network)
    devices, routes, addresses6 = out.split("---")
    interfaces = [line.split(":")[0].strip() for line in devices.splitlines()[2:]]
    assert interfaces == ["lo"]
    assert ("127.0.0.1" in routes) == lo_up  # lo has its address only once it is up
    if os.path.exists("/proc/net/if_inet6"):  # (not on a kernel booted without IPv6)
        assert ("00000000000000000000000000000001" in addresses6) == lo_up


def test_ipc_namespace_hides_host_sysv_objects(runtime, rootfs):
    out = run(runtime, rootfs, "cat /proc/sysvipc/shm /proc/sysvipc/msg /proc/sysvipc/sem")
    assert len(out.splitlines()) == 3  # the three header lines, no objects


def test_host_root_is_invisible(runtime, rootfs, tmp_path):
    # in the host's / where we may write there, else in a directory of ours
    marker = Path("/" if os.geteuid() == 0 else tmp_path) / f"minictr-marker-{uuid.uuid4().hex}"
    marker.write_text("host")
    try:
        out = run(runtime, rootfs, f"ls -a / /..; cat {marker} 2>/dev/null || echo absent")
    finally:
        marker.unlink()
    assert marker.name not in out
    assert out.endswith("absent\n")


def test_chroot_dotdot_escape_finds_nothing(runtime, rootfs):
    # The classic escape: chdir above the root. After pivot_root and detaching the old root
    # there is nothing above, so "/.." is "/".
    out = run(runtime, rootfs, "cd /../../..; ls -di . /; cat /proc/1/mountinfo")
    inodes = {line.split()[0] for line in out.splitlines()[:2]}
    assert len(inodes) == 1
    mount_points = {line.split()[4] for line in out.splitlines()[2:]}
    assert not any(p.startswith(("/home", "/work", "/boot", "/var/lib")) for p in mount_points)


def test_mounts_do_not_propagate_to_the_host(runtime, rootfs):
    before = Path("/proc/self/mountinfo").read_text()
    run(runtime, rootfs, "ls /proc /dev /tmp >/dev/null")
    assert Path("/proc/self/mountinfo").read_text() == before


def test_proc_is_fresh_and_dev_is_minimal(runtime, rootfs):
    out = run(runtime, rootfs, "ls /dev; echo ---; cat /proc/1/cmdline | head -c 200; echo; "
                               "echo x > /dev/null && head -c 4 /dev/zero | wc -c")
    dev, rest = out.split("---")
    assert set(dev.split()) == {"fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr",
                                "stdin", "stdout", "tty", "urandom", "zero"}
    assert rest.strip().endswith("4")


def test_nothing_in_the_root_names_the_host_or_its_cache(runtime, tmp_path):
    """The cache's manifest (host paths, devices, inodes, mtimes) lies beside a rootfs, not
    in it; and the overlay's options show no host path either."""
    cache = tmp_path / "cache"
    fresh = RootfsBuilder(cache).build(binaries=["sh", "ls", "grep", "cat"])
    out = run(runtime, fresh, f"ls -A /; echo ---; grep -rlF -e '{cache}' -e mtime_ns / "
                              "--exclude-dir=proc --exclude-dir=sys --exclude-dir=dev; "
                              f"grep -F '{cache}' /proc/self/mountinfo; true")
    top, found = out.split("---")
    assert not [name for name in top.split() if "minictr" in name], top
    assert found.split() == []


def test_writes_reach_neither_the_base_nor_the_next_container(runtime, rootfs):
    run(runtime, rootfs, "echo scribble > /etc/passwd; mkdir -p /new/dir; touch /usr/bin/x; "
                         "echo t > /tmp/t")
    assert "scribble" not in (Path(rootfs) / "etc/passwd").read_text()
    assert not (Path(rootfs) / "new").exists() and not (Path(rootfs) / "usr/bin/x").exists()
    out = run(runtime, rootfs, "cat /etc/passwd; ls /new /tmp/t 2>&1 || true")
    assert "scribble" not in out and "No such file" in out


def test_environment_is_clean(runtime, rootfs, monkeypatch):
    monkeypatch.setenv("MINICTR_HOST_SECRET", "leak")
    out = runtime.run(rootfs, ["cat", "/proc/self/environ"], env={"EXTRA": "1"}).wait().stdout
    assert sorted(out.decode().rstrip("\0").split("\0")) == [
        "EXTRA=1", "HOME=/root", f"PATH={DEFAULT_PATH}", "TERM=dumb"]


def test_cwd_and_env(runtime, rootfs):
    out = run(runtime, rootfs, 'pwd; echo "$GREETING"', cwd="/etc", env={"GREETING": "hi"})
    assert out == "/etc\nhi\n"


@needs_root  # without root, container root is the caller's uid: tests/test_rootless.py
def test_container_root_is_an_unprivileged_host_uid_that_owns_the_rootfs(runtime, rootfs):
    from pytest_minictr.host.idmap import MAPPED_IDS, id_range
    out = run(runtime, rootfs, "id -u; cat /proc/self/uid_map; stat -c %u /etc; "
                               "touch /top /etc/new /tmp/x && echo written")
    lines = out.split()
    assert lines[0] == "0"
    assert lines[1:4] == ["0", str(id_range("subuid")), str(MAPPED_IDS)]
    assert lines[4:] == ["0", "written"]  # the host-root-owned base reads as its own


@needs_root
def test_user_false_keeps_host_root(runtime, rootfs):
    out = run(runtime, rootfs, "id -u; cat /proc/self/uid_map", user=False)
    assert out.split() == ["0", "0", "0", "4294967295"]


@needs_root  # the strongest hand (host root inside, CAP_SYS_PTRACE) is root's to give
def test_the_callers_stdio_is_out_of_reach(runtime, rootfs):
    # the init is the only process whose fds a command could reach through /proc: its 0-2
    # are /dev/null, not whatever the caller had (a log file, a terminal)
    # (with the strongest hand: host root holding CAP_SYS_PTRACE; by default root inside
    # cannot even list them, see tests/security)
    out = run(runtime, rootfs, "ls -l /proc/1/fd/0 /proc/1/fd/1 /proc/1/fd/2", user=False,
              capabilities=["SYS_PTRACE"])
    assert [line.split("-> ")[1] for line in out.splitlines()] == ["/dev/null"] * 3


@needs_root
def test_garbage_written_to_the_inits_pipes_harms_nobody(runtime, rootfs):
    bystander = runtime.run(rootfs, ["sleep", "1"])
    run(runtime, rootfs, "for fd in /proc/1/fd/*; do echo 'not json' > $fd; done 2>/dev/null; "
                         "true", user=False, capabilities=["SYS_PTRACE"])
    assert bystander.wait().returncode == 0
    assert run(runtime, rootfs, "echo still serving") == "still serving\n"


@needs_root  # it mounts a tmpfs on the host, below the bind
def test_a_read_only_bind_is_read_only_all_the_way_down(runtime, rootfs, tmp_path):
    from pytest_minictr import Mount
    from pytest_minictr.host.linux import mount, umount2
    (tmp_path / "sub").mkdir()
    mount("tmpfs", str(tmp_path / "sub"), "tmpfs")
    try:
        out = run(runtime, rootfs, "touch /data/top /data/sub/deep 2>&1; true",
                  mounts=[Mount.bind(tmp_path, "/data")], user=False)  # host root, even so
        assert out.count("Read-only file system") == 2
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]
    finally:
        umount2(str(tmp_path / "sub"))


@needs_root  # it mounts a tmpfs on the host
def test_a_mount_made_on_the_host_after_the_spares_copied_the_mounts_is_seen(runtime, rootfs,
                                                                               tmp_path):
    from pytest_minictr import Mount
    from pytest_minictr.host.linux import mount, umount2
    (tmp_path / "before").write_text("")
    run(runtime, rootfs, "true")
    time.sleep(0.5)  # the next spares are ready: their copies of the host's mounts are made
    mount("tmpfs", str(tmp_path), "tmpfs")
    try:
        (tmp_path / "after").write_text("")
        for _ in range(3):  # every spare made before the mount
            assert run(runtime, rootfs, "ls /data", mounts=[Mount.bind(tmp_path, "/data")]) \
                == "after\n"
    finally:
        umount2(str(tmp_path))


def test_symlinks_in_the_image_cannot_place_mount_points_on_the_host(runtime, tmp_path):
    from pytest_minictr import ContainerSetupError, Mount, RootfsBuilder
    image = RootfsBuilder().build(binaries=["sh"], dest=tmp_path / "image")
    target = tmp_path / "host-side"
    (image / "data").symlink_to(target)
    with pytest.raises(ContainerSetupError, match="/data is a symlink in the rootfs"):
        runtime.run(image, ["sh", "-c", "true"], mounts=[Mount.tmpfs("/data/x")])
    assert not target.exists()


def test_rlimits_default_and_override(runtime, rootfs):
    out = run(runtime, rootfs, "ulimit -c; ulimit -n; ulimit -Hn; ulimit -f")
    core, soft, hard, fsize = out.split()
    assert (core, soft, hard) == ("0", "1024", "4096") and fsize != "unlimited"
    out = run(runtime, rootfs, "ulimit -n; ulimit -c", rlimits={"nofile": 64, "core": "unlimited"})
    assert out.split() == ["64", "unlimited"]


def test_an_rlimit_the_kernel_refuses_names_itself(runtime, rootfs):
    from pytest_minictr import ContainerSetupError
    with pytest.raises(ContainerSetupError, match=r"set rlimits: nofile=\(2147483647, "):
        runtime.run(rootfs, ["true"], rlimits={"nofile": 2**31 - 1})
