"""`minictr pull | images | rmi | image prune | image inspect | login | logout` against a real
registry on loopback, as a user types them."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pytest_minictr.cli.image_commands import ProgressBar
from pytest_minictr.cli.main import main
from pytest_minictr.images.registry import host_platform_name
from tests.oci_registry import Registry, layout_of
from tests.test_images import layer, member

SECRET = "cli-S3cret"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    place = tmp_path_factory.mktemp("cli-registry")
    server = Registry(place / "server", user="tester", password=SECRET)
    server.image = server.push(layout_of(
        place / "app", [layer(member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
                              member("etc/motd", b"hi"))],
        {"Cmd": ["cat", "/etc/motd"], "Labels": {"team": "qa"}}), "test/app")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def own_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICTR_IMAGE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def run(capsys, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO(stdin))
        status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_login_pull_images_inspect_rmi_prune_logout(registry, capsys):
    status, _, err = run(capsys, "pull", registry.image)
    assert status == 125 and "minictr login" in err
    status, out, err = run(capsys, "login", registry.host, "-u", "tester", "--password-stdin",
                           stdin="wrong\n")
    assert status == 125 and "refused these credentials" in err and "wrong" not in out + err
    status, out, err = run(capsys, "login", registry.host, "-u", "tester", "--password-stdin",
                           stdin=SECRET + "\n")
    assert status == 0 and "Login Succeeded" in out and SECRET not in out + err
    status, out, _ = run(capsys, "pull", registry.image)
    assert status == 0 and out.startswith(f"{registry.image}:latest: sha256:")
    status, out, _ = run(capsys, "images", "--json")
    (image,) = json.loads(out)
    assert image["reference"] == f"{registry.image}:latest" and len(image["layers"]) == 1
    status, out, _ = run(capsys, "images")
    assert out.splitlines()[0].split() == ["REFERENCE", "DIGEST", "PLATFORM", "SIZE"]
    status, out, _ = run(capsys, "image", "inspect", registry.image)
    details = json.loads(out)
    assert details["labels"] == {"team": "qa"} and details["config"]["Cmd"] == [
        "cat", "/etc/motd"] and details["digest"] == image["digest"]
    status, out, _ = run(capsys, "rmi", registry.image)
    assert status == 0 and out.splitlines()[0] == f"Untagged: {registry.image}:latest"
    assert "Deleted: sha256:" in out
    assert run(capsys, "image", "prune")[1].startswith("removed 0 layers")
    status, _, err = run(capsys, "image", "inspect", registry.image)
    assert status == 125 and "no image" in err
    assert run(capsys, "logout", registry.host)[1].startswith("Removing login credentials")
    assert run(capsys, "logout", registry.host)[1].startswith("Not logged in")


def test_a_foreign_platform_is_refused_before_any_download(registry, capsys):
    foreign = "linux/s390x" if host_platform_name() != "linux/s390x" else "linux/amd64"
    status, _, err = run(capsys, "pull", "--platform", foreign, registry.image)
    assert status == 125 and "does not emulate" in err


def test_a_bad_reference_says_why(capsys):
    status, _, err = run(capsys, "pull", "Alpine")
    assert status == 125 and "image reference 'Alpine'" in err


def test_the_progress_bar_counts_every_layer(capsys):
    bar = ProgressBar("alpine")
    bar.update("sha256:a", 1 << 20, 2 << 20)
    bar.update("sha256:b", 2 << 20, 2 << 20)
    bar.close()
    last = capsys.readouterr().err.split("\r")[-1]
    assert last == f"alpine [{'#' * 22}{'.' * 8}] 3M/4M\n"
