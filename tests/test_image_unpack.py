"""A store layer unpacked from hostile input: whatever the members, nothing lands outside the
layer's directory; whiteouts become overlay's; a bomb stops at the budget. A hostile
manifest is refused with a RegistryError or ConfigError, never a traceback of ours."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_minictr.errors import ConfigError, RootfsError
from pytest_minictr.images.pull import decompressed
from pytest_minictr.images.reference import parse_reference
from pytest_minictr.images.registry import RegistryClient
from pytest_minictr.images.transport import RegistryError
from pytest_minictr.images.unpack import Budget, unpack_layer
from tests.test_images import layer, member


def unpack(data: bytes, dest: Path, limit: int = 1 << 20, keep_setuid: bool = True) -> None:
    dest.mkdir(exist_ok=True)
    unpack_layer(io.BytesIO(data), str(dest), Budget(limit), keep_setuid)


@pytest.mark.parametrize("members, refused", [
    ([member("../evil", b"x")], "'../evil' points outside"),
    ([member("/evil", b"x")], "'/evil' points outside"),
    ([member("esc", kind=tarfile.SYMTYPE, link="../outside"), member("esc/evil", b"x")],
     "goes through '/esc', which is not a directory"),
    ([member("hard", kind=tarfile.LNKTYPE, link="../outside/f")], "points outside"),
    ([member("hard", kind=tarfile.LNKTYPE, link="esc")], "not a file unpacked before it"),
    ([member("big", b"x" * 4096)], "more than its size limit"),
    ([member("esc", kind=tarfile.SYMTYPE, link="../outside"), member("esc/.wh.f")],
     "not a directory"),
], ids=["dotdot", "absolute", "through-symlink", "hardlink-out", "hardlink-missing", "bomb",
        "whiteout-through-symlink"])
def test_hostile_members_are_refused(tmp_path, members, refused):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("keep")
    with pytest.raises(RootfsError, match=refused):
        unpack(layer(*members), tmp_path / "layer", limit=1024)
    assert os.listdir(tmp_path / "outside") == ["f"]
    assert (tmp_path / "outside" / "f").read_text() == "keep"


def test_a_decompression_bomb_stops_at_the_budget(tmp_path):
    # 64 MiB of zeros is a 64 KiB gzip blob: the budget, not the download, must stop it
    bomb = gzip.compress(layer(member("zeros", bytes(64 << 20))), compresslevel=9)
    assert len(bomb) < 128 << 10
    with pytest.raises(RootfsError, match="more than its size limit"):
        unpack_layer(decompressed(io.BufferedReader(io.BytesIO(bomb))),  # type: ignore[arg-type]
                     str(tmp_path), Budget(1 << 20), keep_setuid=True)


@pytest.mark.needs_root  # an account may not make setuid files of other owners' ids
def test_devices_are_skipped_and_setuid_kept_only_when_asked(tmp_path):
    data = layer(member("dev/", kind=tarfile.DIRTYPE, mode=0o755),
                 member("dev/sda", kind=tarfile.BLKTYPE), member("fifo", kind=tarfile.FIFOTYPE),
                 member("su", b"#!", mode=0o4755))
    unpack(data, tmp_path / "root-store")
    unpack(data, tmp_path / "account-store", keep_setuid=False)
    assert os.listdir(tmp_path / "root-store" / "dev") == []
    assert not (tmp_path / "root-store" / "fifo").exists()
    assert (tmp_path / "root-store" / "su").stat().st_mode & 0o7777 == 0o4755
    assert (tmp_path / "account-store" / "su").stat().st_mode & 0o7777 == 0o755


@pytest.mark.needs_root  # trusted.* xattrs are root's
def test_whiteouts_become_overlays(tmp_path):
    unpack(layer(member("etc/.wh.passwd"), member("var/cache/.wh..wh..opq"),
                 member("kept", b"k"), member(".wh.kept")), tmp_path / "l")
    whiteout = os.lstat(tmp_path / "l" / "etc" / "passwd")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(tmp_path / "l" / "var" / "cache", "trusted.overlay.opaque") == b"y"
    assert (tmp_path / "l" / "kept").read_text() == "k"  # the layer's own file wins


NAMES = st.sampled_from(["a", "b", "a/b", "esc", "esc/x", "..", "../x", "/abs", "a/../..",
                         "./a", "c/.wh.a", ".wh...", "a/.wh.", ".wh..wh..opq",
                         "a/.wh..wh..opq", "", "d/e/f"])
TARGETS = st.sampled_from(["../outside", "/", "a", "esc", "../outside/f", "/etc/passwd", ""])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.CHRTYPE, tarfile.FIFOTYPE])
MEMBERS = st.lists(st.tuples(NAMES, KINDS, TARGETS, st.integers(0, 0o7777)), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MEMBERS)
def test_fuzzed_layers_write_nothing_outside(members):
    with tempfile.TemporaryDirectory() as box:
        outside = Path(box, "outside")
        outside.mkdir()
        (outside / "f").write_text("keep")
        data = layer(*(member(name, b"data" if kind == tarfile.REGTYPE else b"", kind, mode,
                              target) for name, kind, target, mode in members))
        try:
            unpack(data, Path(box, "layer"), limit=64)
        except RootfsError:
            pass
        assert sorted(os.listdir(box)) == ["layer", "outside"]
        assert os.listdir(outside) == ["f"] and (outside / "f").read_text() == "keep"
        assert os.stat(outside / "f").st_nlink == 1  # no hard link made to it


class _Answer(io.BytesIO):
    headers: ClassVar[dict[str, str]] = {}


class _Transport:
    """Serves one manifest document, whatever is asked."""

    def __init__(self, body: bytes):
        self.body = body

    def get(self, path: str, accept: str = "") -> _Answer:
        return _Answer(self.body)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(
                        ["layers", "config", "manifests", "digest", "size", "platform",
                         "mediaType", "os", "architecture"]), inner, max_size=4),
                    max_leaves=12)


@functools.cache
def _client() -> RegistryClient:
    return RegistryClient(parse_reference("127.0.0.1:1/x"))  # (its TLS context costs ~50 ms)


@settings(max_examples=200, deadline=None)
@given(JSON)
@example({"config": {"digest": "sha256:" + "0" * 64, "size": 1}, "layers": 5})
@example({"manifests": [{"platform": {"os": "linux", "architecture": "amd64"},
                         "digest": "sha256:" + "0" * 64}]})
def test_fuzzed_manifests_are_refused_cleanly(document):
    client = _client()
    client.transport = _Transport(json.dumps(document).encode())  # type: ignore[assignment]
    try:
        client.manifest("linux/amd64")
    except (RegistryError, ConfigError):
        pass


def test_a_layer_of_many_empty_files_is_a_bomb_too(tmp_path):
    empties = layer(*(member(f"e{index}") for index in range(3000)))
    with pytest.raises(RootfsError, match="more than its size limit"):
        unpack(empties, tmp_path / "l", limit=1 << 20)
