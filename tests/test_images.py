"""Image tarballs (`docker save`, OCI layout) unpacked with no daemon: layers in order,
whiteouts honoured, and hostile members refused or neutralised; the recipes; the cache's
list and prune."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pytest_minictr import ConfigError, RootfsBuilder, RootfsError
from pytest_minictr.rootfs import recipe as recipes
from pytest_minictr.rootfs.images import import_image

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = "/bin/busybox"


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
           link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def layer(*members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def docker_save(path: Path, *layers: bytes, config: dict | None = None) -> Path:
    """An image as `docker save` writes it: manifest.json naming each layer.tar, and the
    image's config (its `config` key holds Cmd, Entrypoint...) if given."""
    files = {f"layer{i}/layer.tar": data for i, data in enumerate(layers)}
    files["manifest.json"] = json.dumps([{"Config": "config.json", "RepoTags": ["t:1"],
                                          "Layers": list(files)}]).encode()
    if config is not None:
        files["config.json"] = json.dumps({"config": config}).encode()
    return _tar(path, files)


def oci_layout(path: Path, *layers: bytes) -> Path:
    """An OCI image layout: index.json -> manifest blob -> gzipped layer blobs."""
    files, digests = {}, []
    for data in layers:
        blob = gzip.compress(data)
        digest = hashlib.sha256(blob).hexdigest()
        files[f"blobs/sha256/{digest}"] = blob
        digests.append(digest)
    manifest = json.dumps({"layers": [{"digest": f"sha256:{d}"} for d in digests]}).encode()
    manifest_digest = hashlib.sha256(manifest).hexdigest()
    files[f"blobs/sha256/{manifest_digest}"] = manifest
    files["index.json"] = json.dumps(
        {"manifests": [{"digest": f"sha256:{manifest_digest}"}]}).encode()
    return _tar(path, files)


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make", [docker_save, oci_layout], ids=["docker-save", "oci"])
def test_layers_apply_in_order_with_whiteouts(tmp_path, make):
    lower = layer(member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
                  member("etc/keep", b"lower\n"), member("etc/gone", b"x"),
                  member("cache/", kind=tarfile.DIRTYPE, mode=0o755),
                  member("cache/old", b"old"), member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
                  member("bin/sh-link", kind=tarfile.SYMTYPE, link="/bin/busybox"))
    upper = layer(member("etc/keep", b"upper\n"), member("etc/.wh.gone"),
                  member("cache/.wh..wh..opq"), member("cache/new", b"new"),
                  member("etc/suid", b"#!", mode=0o4755))
    root = import_image(str(make(tmp_path / "image.tar", lower, upper)),
                        str(tmp_path / "root"), 2**20)
    assert (root / "etc/keep").read_text() == "upper\n"
    assert not (root / "etc/gone").exists()
    assert sorted(os.listdir(root / "cache")) == ["new"]
    assert os.readlink(root / "bin/sh-link") == "/bin/busybox"  # absolute: resolved inside
    assert (root / "etc/suid").stat().st_mode & 0o7777 == 0o755  # setuid dropped


@pytest.mark.parametrize("members, refused", [
    ([member("../evil", b"x")], "'../evil' points outside"),
    ([member("/etc/evil", b"x")], "'/etc/evil' points outside"),
    ([member("a/../../evil", b"x")], "points outside"),
    ([member("esc", kind=tarfile.SYMTYPE, link="/tmp"), member("esc/evil", b"x")],
     "goes through '/esc', which is not a directory"),
    ([member("hard", kind=tarfile.LNKTYPE, link="/etc/passwd")], "points outside"),
    ([member("hard", kind=tarfile.LNKTYPE, link="missing")], "not a file unpacked before it"),
    ([member("big", b"x" * 4096)], "more than its size limit"),
], ids=["dotdot", "absolute", "dotdot-inside", "through-symlink", "hardlink-abs",
        "hardlink-missing", "huge"])
def test_hostile_members_are_refused_and_leave_nothing(tmp_path, members, refused):
    image = docker_save(tmp_path / "bad.tar", layer(*members))
    outside = tmp_path / "evil"
    with pytest.raises(RootfsError, match=refused):
        # a 1 KiB budget (a sparse file counts at its full size, like any other)
        import_image(str(image), str(tmp_path / "root"), 1024)
    assert not (tmp_path / "root").exists() and not outside.exists()
    assert not Path("/tmp/evil").exists() and not Path("/etc/evil").exists()


def test_device_nodes_and_fifos_are_left_out(tmp_path):
    image = docker_save(tmp_path / "dev.tar", layer(
        member("dev/", kind=tarfile.DIRTYPE, mode=0o755),
        member("dev/sda", kind=tarfile.BLKTYPE), member("dev/mem", kind=tarfile.CHRTYPE),
        member("fifo", kind=tarfile.FIFOTYPE), member("ok", b"fine")))
    root = import_image(str(image), str(tmp_path / "root"), 2**20)
    assert os.listdir(root / "dev") == [] and not (root / "fifo").exists()
    assert (root / "ok").read_text() == "fine"


def test_not_an_image_says_so(tmp_path):
    plain = _tar(tmp_path / "plain.tar", {"hello": b"x"})
    with pytest.raises(RootfsError, match=r"no manifest.json .* or index.json"):
        import_image(str(plain), str(tmp_path / "root"), 2**20)


def test_an_imported_image_runs(runtime, tmp_path):
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} is not installed (Debian: busybox-static)")
    image = docker_save(tmp_path / "busybox.tar", layer(
        member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
        member("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755),
        member("bin/sh", kind=tarfile.SYMTYPE, link="busybox"),
        member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
        member("etc/motd", b"from an image\n")))
    done = subprocess.run([sys.executable, "-m", "pytest_minictr", "rootfs", "import",
                           str(image), str(tmp_path / "root")], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.returncode == 0, done.stderr
    result = runtime.run(tmp_path / "root", ["sh", "-c", "busybox cat /etc/motd"]).wait()
    assert result.stdout == b"from an image\n", result.stderr


def minictr(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cache is not None:
        env["MINICTR_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "pytest_minictr", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def busybox_image(path: Path, config: dict | None) -> Path:
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} is not installed (Debian: busybox-static)")
    return docker_save(path, layer(
        member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
        member("bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755),
        member("bin/sh", kind=tarfile.SYMTYPE, link="busybox")), config=config)


def test_an_imported_images_entrypoint_and_cmd_run_when_no_command_is_given(tmp_path):
    image = busybox_image(tmp_path / "image.tar", {"Entrypoint": ["sh", "-c"],
                                                   "Cmd": ["echo from the image"]})
    assert minictr("rootfs", "import", str(image), str(tmp_path / "root")).returncode == 0
    done = minictr("run", "--rootfs", str(tmp_path / "root"))
    assert (done.returncode, done.stdout) == (0, "from the image\n"), done.stderr


def test_an_imported_image_without_cmd_says_so(runtime, tmp_path):
    image = busybox_image(tmp_path / "image.tar", {"Env": ["PATH=/bin"]})
    assert minictr("rootfs", "import", str(image), str(tmp_path / "root")).returncode == 0
    done = minictr("run", "--rootfs", str(tmp_path / "root"))
    assert done.returncode == 125
    assert done.stderr == (f"minictr: error: --rootfs {tmp_path}/root and no command: the "
                           f"image imported into '{tmp_path}/root' had no Cmd (nor Entrypoint) "
                           "to run by default; give the command\n")
    with pytest.raises(ConfigError, match=r"^command=None: the image imported into .* had no "
                                          r"Cmd"):
        runtime.run(tmp_path / "root")


# --- recipes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, command, expected", [
    ("minimal", ["sh", "-c", "echo hi | tr a-z A-Z | wc -l"], b"1\n"),
    ("busybox", ["sh", "-c", "ls / >/dev/null && echo busy"], b"busy\n"),
    ("python3", ["python3", "-c", "import json, ssl; print(json.dumps([ssl.HAS_SNI]))"],
     b"[true]\n"),
])
def test_each_recipe_builds_runs_and_is_cached(runtime, tmp_path, name, command, expected):
    if name == "busybox" and not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} is not installed (Debian: busybox-static)")
    builder = RootfsBuilder(cache_dir=tmp_path)
    root = builder.build(recipe=name)
    assert builder.build(recipe=name) == root
    result = runtime.run(root, command).wait()
    assert (result.returncode, result.stdout) == (0, expected), result.stderr


def test_a_recipe_of_ones_own_and_its_errors(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text('binaries = ["sh", # a comment\n  "cat",\n]\n')
    assert recipes.load(str(tmp_path / "mine.toml")).binaries == ("sh", "cat")
    monkeypatch.setenv("MINICTR_RECIPE_PATH", str(tmp_path))
    assert "mine" in recipes.available() and recipes.load("mine").name == "mine"
    (tmp_path / "bad.toml").write_text('binaries = "sh"\n')
    with pytest.raises(ConfigError, match="binaries = 'sh': expected a list of strings"):
        recipes.load("bad")
    (tmp_path / "odd.toml").write_text('packages = ["sh"]\n')
    with pytest.raises(ConfigError, match="unknown key 'packages'"):
        recipes.load("odd")
    with pytest.raises(ConfigError, match=r"no such recipe .*python3"):
        recipes.load("nonesuch")


def test_the_recipes_read_the_same_without_tomllib():
    for name in recipes.available():
        text = Path(recipes.find(name)).read_text()
        assert recipes.parse_toml_subset(text) == recipes.parse_toml(text), name


def test_rootfs_list_and_prune(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINICTR_CACHE_DIR": str(tmp_path)}
    RootfsBuilder(cache_dir=tmp_path).build(recipe="minimal")

    def minictr(*args):
        return subprocess.run([sys.executable, "-m", "pytest_minictr", "rootfs", *args],
                              capture_output=True, text=True, env=env, timeout=60)
    listed = json.loads(minictr("list", "--json").stdout)
    assert [entry["recipe"] for entry in listed] == ["minimal"] and listed[0]["size"] > 0
    assert minictr("prune").returncode == 0
    assert json.loads(minictr("list", "--json").stdout) == [] and os.listdir(tmp_path) == []


def test_a_tarball_of_dot_prefixed_members_imports_as_docker_and_podman_take_it(tmp_path):
    """`tar -C dir -c .` (what a hand-made `docker save` directory gives) names every member
    './manifest.json', './layer0/layer.tar'; and layers may be made the same way."""
    saved = tmp_path / "saved"
    (saved / "layer0").mkdir(parents=True)
    files = tmp_path / "files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "motd").write_text("dotted\n")
    subprocess.run(["tar", "-C", str(files), "-cf", str(saved / "layer0" / "layer.tar"), "."],
                   check=True, timeout=30)
    (saved / "manifest.json").write_text(json.dumps([{"Layers": ["./layer0/layer.tar"]}]))
    image = tmp_path / "image.tar"
    subprocess.run(["tar", "-C", str(saved), "-cf", str(image), "."], check=True, timeout=30)
    assert "./manifest.json" in tarfile.open(image).getnames()
    root = import_image(str(image), str(tmp_path / "root"), 2**30)
    assert (root / "etc" / "motd").read_text() == "dotted\n"
