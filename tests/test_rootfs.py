"""Tests of pytest_minictr.rootfs against the real host filesystem (and chroot, as root)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_minictr.errors import ConfigError, RootfsError
from pytest_minictr.rootfs import builder as rootfs
from pytest_minictr.rootfs.builder import (
    RootfsBuilder,
    default_cache_dir,
    env_command,
    parse_shebang,
)
from pytest_minictr.rootfs.cache import default_command

REPO = Path(__file__).resolve().parents[1]
CHROOT = shutil.which("chroot")
needs_chroot = pytest.mark.skipif(os.geteuid() != 0 or CHROOT is None,
                                  reason="running a built rootfs needs root and chroot(8)")


def in_root(root: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROOT, str(root), "/bin/sh", "-c", script],
                          capture_output=True, text=True, timeout=30)


def entries(cache: Path) -> list[str]:
    return sorted(os.listdir(cache))


def manifest(root: Path) -> dict:
    """The manifest of a cache entry: beside its rootfs, never inside."""
    return json.loads((root.parent / rootfs.MANIFEST_NAME).read_text())


@pytest.fixture
def builder(tmp_path) -> RootfsBuilder:
    return RootfsBuilder(tmp_path / "cache")


@pytest.fixture
def shell_root(builder) -> Path:
    return builder.build(binaries=["sh", "echo", "cat"])


def test_binaries_copied_at_host_paths_with_symlinks(shell_root):
    for name in ("sh", "echo", "cat"):
        host = shutil.which(name)
        assert os.path.lexists(shell_root / host.lstrip("/")), host
    assert os.readlink(shell_root / "usr/bin/sh") == os.readlink("/usr/bin/sh")
    for top in rootfs.MERGED_USR_LINKS:
        if os.path.islink("/" + top) and os.path.isdir("/" + top):
            assert os.readlink(shell_root / top) == os.readlink("/" + top)
    if os.path.islink("/bin"):
        assert os.readlink(shell_root / "bin") == "usr/bin"


def test_skeleton_dirs_files_and_modes(shell_root):
    assert stat.S_IMODE(os.stat(shell_root).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(shell_root / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(shell_root / "var/tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(shell_root / "root").st_mode) == 0o700
    for name in ("proc", "dev", "sys", "etc", "home", "run"):
        assert (shell_root / name).is_dir()
    passwd = (shell_root / "etc/passwd").read_text()
    assert "root:x:0:0:root:/root:/bin/sh" in passwd and ":65534:" in passwd
    assert "nogroup:x:65534:" in (shell_root / "etc/group").read_text()
    assert "127.0.0.1\tlocalhost" in (shell_root / "etc/hosts").read_text()
    assert "hosts: files" in (shell_root / "etc/nsswitch.conf").read_text()
    assert stat.S_IMODE(os.stat(shell_root / "etc/passwd").st_mode) == 0o644


@needs_chroot
def test_built_root_runs_a_pipeline_and_has_libc_and_loader(shell_root):
    result = in_root(shell_root, "echo hi | cat")
    assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr
    libs = [line.split()[-2] if "=>" in line else line.split()[0]
            for line in subprocess.run(["ldd", "/usr/bin/cat"], capture_output=True,
                                       text=True, check=True).stdout.splitlines()
            if "/" in line]
    assert any("libc.so" in lib for lib in libs) and any("ld-linux" in lib for lib in libs)
    checks = " && ".join(f"[ -f {lib} ]" for lib in libs)
    assert in_root(shell_root, checks).returncode == 0, libs


def test_second_build_is_a_cache_hit(builder, shell_root):
    before = entries(builder.cache_dir)
    assert builder.build(binaries=["cat", "echo", "sh", "sh"]) == shell_root
    assert entries(builder.cache_dir) == before == [shell_root.parent.name]


def test_missing_binary_is_named(builder):
    with pytest.raises(RootfsError, match=r"nosuchcmd. not found on this host.s PATH: install it"):
        builder.build(binaries=["sh", "nosuchcmd"])


def test_missing_absolute_binary_is_named(builder, tmp_path):
    with pytest.raises(RootfsError, match="nothere"):
        builder.build(binaries=[tmp_path / "nothere"])


def script(tmp_path: Path, name: str, shebang: str, body: str = "echo from-script\n") -> Path:
    path = tmp_path / name
    path.write_text(f"{shebang}\n{body}")
    path.chmod(0o755)
    return path


def test_script_with_missing_interpreter_names_both_and_leaves_no_temp(builder, tmp_path):
    path = script(tmp_path, "broken.sh", "#!/nonexistent/interp -x")
    with pytest.raises(RootfsError) as info:
        builder.build(binaries=[path])
    assert str(path) in str(info.value) and "/nonexistent/interp" in str(info.value)
    assert entries(builder.cache_dir) == []


def test_env_script_with_missing_command_names_it(builder, tmp_path):
    path = script(tmp_path, "envy", "#!/usr/bin/env -S no-such-interp-xyz -u")
    with pytest.raises(RootfsError, match="no-such-interp-xyz"):
        builder.build(binaries=[path])


@needs_chroot
def test_sh_script_pulls_in_sh(builder, tmp_path):
    path = script(tmp_path, "hello.sh", "#!/bin/sh")
    root = builder.build(binaries=[path])
    assert (root / str(path).lstrip("/")).is_file()
    result = subprocess.run([CHROOT, str(root), str(path)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "from-script\n"), result.stderr


@needs_chroot
def test_env_script_pulls_in_env_and_the_command(builder, tmp_path):
    path = script(tmp_path, "hello-env", "#!/usr/bin/env sh")
    root = builder.build(binaries=[path])
    result = subprocess.run([CHROOT, str(root), str(path)], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stdout) == (0, "from-script\n"), result.stderr


def test_static_binary_gets_no_libraries(builder):
    busybox = "/bin/busybox"
    if not os.path.isfile(busybox):
        pytest.skip(f"{busybox} missing (install busybox-static)")
    if not shutil.which("file"):
        pytest.skip("file(1) is not installed (Debian: file): it tells a static binary")
    if "statically linked" not in subprocess.run(["file", "-L", busybox], capture_output=True,
                                                 text=True).stdout:
        pytest.skip(f"{busybox} is not statically linked (install busybox-static)")
    root = builder.build(binaries=[busybox])
    sources = [s["path"] for s in manifest(root)["sources"]]
    assert not [p for p in sources if ".so" in p or p == rootfs.LD_SO_CACHE], sources
    if os.geteuid() == 0 and CHROOT:
        result = subprocess.run([CHROOT, str(root), busybox, "echo", "static"],
                                capture_output=True, text=True)
        assert result.stdout == "static\n", result.stderr


def test_library_not_found_names_binary_and_library(builder, monkeypatch):
    real_run = subprocess.run

    def fake_ldd(cmd, **kwargs):
        if os.path.basename(cmd[0]) != "ldd":
            return real_run(cmd, **kwargs)
        out = "\tlinux-vdso.so.1 (0x1)\n\tlibmissing.so.7 => not found\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(subprocess, "run", fake_ldd)
    with pytest.raises(RootfsError, match=r"cat.*libmissing\.so\.7.*not found"):
        builder.build(binaries=["cat"])


def test_stale_library_triggers_rebuild_and_old_entry_is_kept_aside(builder, shell_root):
    data = manifest(shell_root)
    lib = next(s for s in data["sources"] if "libc.so" in s["path"])
    lib["mtime_ns"] -= 1
    (shell_root.parent / rootfs.MANIFEST_NAME).write_text(json.dumps(data))
    assert builder.build(binaries=["sh", "echo", "cat"]) == shell_root
    fresh = next(s for s in manifest(shell_root)["sources"] if s["path"] == lib["path"])
    assert fresh["mtime_ns"] == os.lstat(lib["path"]).st_mtime_ns
    names = entries(builder.cache_dir)
    assert len(names) == 2 and names[1].startswith(shell_root.parent.name + ".stale-")
    assert (builder.cache_dir / names[1] / "rootfs/usr/bin/cat").exists()


def test_concurrent_builders_agree_and_leave_no_temp_dirs(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys; from pytest_minictr.rootfs.builder import RootfsBuilder; "
            "print(RootfsBuilder(sys.argv[1]).build(binaries=['sh', 'echo', 'cat', 'ls']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    root = Path(paths.pop())
    assert entries(cache) == [root.parent.name]
    assert (root.parent / rootfs.MANIFEST_NAME).is_file() and (root / "usr/bin/ls").exists()


def test_a_recipe_built_into_dest_keeps_its_command_and_nothing_of_the_host(builder, tmp_path):
    recipe = tmp_path / "echoes.toml"
    recipe.write_text('binaries = ["sh"]\ncommand = ["sh", "-c", "echo hi"]\n')
    dest = builder.build(recipe=str(recipe), dest=tmp_path / "dest")
    ours = [path.name for path in dest.iterdir() if "minictr" in path.name]
    assert ours == [".minictr-image.json"]
    assert json.loads((dest / ours[0]).read_text()) == {"command": ["sh", "-c", "echo hi"],
                                                       "from": "recipe"}
    assert default_command(str(dest), "command=None") == ("sh", "-c", "echo hi")
    cached = builder.build(recipe=str(recipe))
    assert not [path for path in cached.iterdir() if "minictr" in path.name]
    assert default_command(str(cached), "command=None") == ("sh", "-c", "echo hi")


def test_dead_builders_temp_dirs_are_removed_live_ones_kept(builder):
    builder.cache_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_dir = builder.cache_dir / f".tmp-{'0' * 32}-{dead.pid}-abcd1234"
    live_dir = builder.cache_dir / f".tmp-{'0' * 32}-{os.getpid()}-abcd1234"
    dead_dir.mkdir()
    live_dir.mkdir()
    builder.build(binaries=["sh"])
    assert not dead_dir.exists() and live_dir.exists()
    live_dir.rmdir()


def test_files_and_dirs_keep_paths_and_symlinks(builder, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/data.txt").write_text("data")
    (tree / "link").symlink_to("sub/data.txt")
    os.mkfifo(tree / "fifo")  # must be skipped, not block the copy
    single = tmp_path / "single.txt"
    single.write_text("one")
    root = builder.build(files=[single], dirs=[tree])
    inner = root / str(tree).lstrip("/")
    assert (inner / "sub/data.txt").read_text() == "data"
    assert os.readlink(inner / "link") == "sub/data.txt"
    assert not os.path.lexists(inner / "fifo")
    assert (root / str(single).lstrip("/")).read_text() == "one"


def test_host_symlinked_file_is_recreated(builder):
    if not os.path.islink("/etc/os-release"):
        pytest.skip("/etc/os-release is not a symlink on this host")
    root = builder.build(files=["/etc/os-release"])
    assert os.readlink(root / "etc/os-release") == os.readlink("/etc/os-release")
    target = os.path.realpath("/etc/os-release")
    assert (root / target.lstrip("/")).read_text() == Path(target).read_text()


def test_setuid_bits_are_dropped(builder, tmp_path):
    path = tmp_path / "suid"
    path.write_text("x")
    path.chmod(0o4755)
    root = builder.build(files=[path])
    assert stat.S_IMODE(os.stat(root / str(path).lstrip("/")).st_mode) == 0o755


def test_missing_file_and_symlink_loop_raise(builder, tmp_path):
    with pytest.raises(RootfsError, match="no-such-file"):
        builder.build(files=[tmp_path / "no-such-file"])
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(RootfsError, match="/a"):
        builder.build(files=[tmp_path / "a"])
    with pytest.raises(RootfsError, match="not a directory"):
        builder.build(dirs=["/etc/passwd"])


@pytest.mark.parametrize("kind, path, problem", [
    ("dirs", "/", "the host's whole root"), ("dirs", "/usr/..", "the host's whole root"),
    ("dirs", "/proc/self", "in /proc"), ("files", "/proc/kmsg", "in /proc"),
    ("dirs", "/sys/kernel", "in /sys"), ("files", "/dev/null", "in /dev")])
def test_the_whole_host_and_the_kernels_trees_are_refused(builder, tmp_path, kind, path,
                                                         problem):
    """Copying / would copy the host; /proc/kmsg would block the build until the kernel logs."""
    with pytest.raises(RootfsError, match=re.escape(problem)):
        builder.build(**{kind: [path]}, dest=tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_symlink_loop_met_while_walking_is_an_error(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "root").mkdir()
    with pytest.raises(RootfsError, match="too many levels of symlinks"):
        rootfs.RootTree(str(tmp_path / "root")).add_path(str(tmp_path / "a"))


def test_dest_builds_outside_cache(builder, tmp_path):
    dest = tmp_path / "dest"
    assert builder.build(binaries=["sh"], dest=dest) == dest
    assert (dest / "usr/bin/dash").exists() or (dest / "bin/sh").exists()
    assert not builder.cache_dir.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert builder.build(binaries=["sh"], dest=empty) == empty


def test_dest_refuses_non_empty_and_cleans_up_on_failure(builder, tmp_path):
    (tmp_path / "occupied").write_text("")
    with pytest.raises(ConfigError, match=str(tmp_path)):
        builder.build(binaries=["sh"], dest=tmp_path)
    with pytest.raises(ConfigError, match="occupied"):
        builder.build(binaries=["sh"], dest=tmp_path / "occupied")
    broken = script(tmp_path, "broken", "#!/nonexistent/interp")
    dest = tmp_path / "dest"
    with pytest.raises(RootfsError, match="nonexistent"):
        builder.build(binaries=["sh", broken], dest=dest)
    assert not dest.exists()
    dest.mkdir()
    with pytest.raises(RootfsError, match="nonexistent"):
        builder.build(binaries=["sh", broken], dest=dest)
    assert dest.is_dir() and not os.listdir(dest)


@pytest.mark.parametrize("bad", ["sh", ["sh", ""], ["a\0b"], [b"sh"], [None], [42], 42])
def test_bad_inputs_raise_config_error(builder, bad):
    with pytest.raises(ConfigError):
        builder.build(binaries=bad)
    with pytest.raises(ConfigError):
        builder.build(files=bad)
    assert not builder.cache_dir.exists()


LONE = "\ud800"  # a lone surrogate: a valid str that os.fsencode() cannot encode


@pytest.mark.parametrize("kind", ["binaries", "files", "dirs"])
def test_strings_the_kernel_cannot_take_are_config_errors(builder, kind):
    with pytest.raises(ConfigError, match=re.escape(f"{kind} item {'/x' + LONE + 'y'!r}: "
                                                    f"{LONE!r} at index 2 cannot be encoded")):
        builder.build(**{kind: ["/x" + LONE + "y"]})
    assert not builder.cache_dir.exists()


def test_unencodable_dest_is_a_config_error(builder, tmp_path):
    with pytest.raises(ConfigError, match=r"dest=.*cannot be encoded"):
        builder.build(binaries=["sh"], dest=tmp_path / f"\udcff{LONE}")  # '\udcff' is fine
    assert os.listdir(tmp_path) == []


def test_dest_that_cannot_be_created_is_a_rootfs_error(builder, tmp_path):
    (tmp_path / "somefile").write_text("")
    for dest, problem in [("/proc/nonexistent/dest", "No such file or directory"),
                          (tmp_path / "somefile/sub", "Not a directory"),
                          (tmp_path / "somefile/a/b", "Not a directory")]:
        with pytest.raises(RootfsError, match=f"dest '{dest}': cannot create it "
                                              f"\\({problem}"):
            builder.build(binaries=["sh"], dest=dest)
    assert sorted(os.listdir(tmp_path)) == ["somefile"]
    assert not builder.cache_dir.exists()


def test_dest_failing_midway_is_a_rootfs_error_and_leaves_nothing(builder, tmp_path,
                                                                  monkeypatch):
    def disk_full(root, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(root, "etc"))

    monkeypatch.setattr(rootfs, "_populate", disk_full)
    dest = tmp_path / "new/parents/dest"
    with pytest.raises(RootfsError, match=f"dest '{dest}': cannot build the rootfs there "
                                          f"\\(No space left on device: {dest}/etc\\)"):
        builder.build(binaries=["sh"], dest=dest)
    assert os.listdir(tmp_path) == []  # the parents it made are gone too
    given_dir = tmp_path / "given"
    given_dir.mkdir(mode=0o750)
    with pytest.raises(RootfsError, match="No space left on device"):
        builder.build(binaries=["sh"], dest=given_dir)
    assert os.listdir(given_dir) == [] and stat.S_IMODE(given_dir.stat().st_mode) == 0o750


def test_unusable_cache_dir_is_a_rootfs_error(tmp_path):
    (tmp_path / "file").write_text("")
    for cache in ("/proc/nonexistent-cache", tmp_path / "file/cache"):
        with pytest.raises(RootfsError, match=f"cache_dir '{cache}'.*(No such file|Not a dir)"):
            RootfsBuilder(cache).build(binaries=["sh"])
    assert os.listdir(tmp_path) == ["file"]


@given(st.text(), st.text())
def test_nul_bytes_are_config_errors(before, after):
    with pytest.raises(ConfigError):
        RootfsBuilder("/nonexistent-cache").build(binaries=[before + "\0" + after])


blank_free = st.binary(min_size=1, max_size=40).filter(
    lambda b: not set(b) & set(b" \t\n"))


@given(blank_free, st.binary(max_size=40).filter(lambda b: b"\n" not in b), st.sampled_from(
    [b" ", b"\t", b" \t "]))
def test_parse_shebang_splits_like_the_kernel(interp, arg, blank):
    arg = arg.strip(b" \t")
    parsed = parse_shebang(b"#!" + blank + interp + blank + arg + blank + b"\nrest")
    assert parsed == (os.fsdecode(interp), os.fsdecode(arg))


def test_parse_shebang_and_env_command():
    assert parse_shebang(b"\x7fELF") is None
    assert parse_shebang(b"#!/bin/sh\n") == ("/bin/sh", "")
    assert env_command("-S python3 -u") == "python3"
    assert env_command("-u HOME A=b perl -w") == "perl"
    assert env_command("-i") is None


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINICTR_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MINICTR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "minictr"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache/minictr"
