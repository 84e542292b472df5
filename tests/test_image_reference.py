"""Image references with Docker's defaults, and the platform names a pull is for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_minictr.errors import ConfigError
from pytest_minictr.images.reference import Reference, parse_reference
from pytest_minictr.images.registry import normalize_platform

HEX = "a" * 64


@pytest.mark.parametrize("text, expected", [
    ("alpine", "docker.io/library/alpine:latest"),
    ("alpine:3.20", "docker.io/library/alpine:3.20"),
    ("myuser/app", "docker.io/myuser/app:latest"),
    ("index.docker.io/library/redis:7", "docker.io/library/redis:7"),
    ("ghcr.io/org/tool:v1.2", "ghcr.io/org/tool:v1.2"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/a/b/c:dev", "localhost:5000/a/b/c:dev"),
    ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest"),
    (f"alpine@sha256:{HEX}", f"docker.io/library/alpine@sha256:{HEX}"),
    (f"quay.io/x/y:1@sha256:{HEX}", f"quay.io/x/y:1@sha256:{HEX}"),
    ("my_user/app-x__y.z", "docker.io/my_user/app-x__y.z:latest"),
])
def test_docker_defaults(text, expected):
    assert str(parse_reference(text)) == expected


def test_parts_and_the_api_host():
    hub = parse_reference("alpine")
    assert (hub.registry, hub.repository, hub.tag, hub.api_host) == \
        ("docker.io", "library/alpine", "latest", "registry-1.docker.io")
    pinned = parse_reference(f"host:5000/app:1@sha256:{HEX}")
    assert pinned.api_host == "host:5000" and pinned.version == f"sha256:{HEX}"


@pytest.mark.parametrize("text, why", [
    ("Alpine", "lower-case"), ("", "lower-case"), ("a//b", "lower-case"),
    ("alpine:", "the tag ''"), ("alpine:-x", "the tag '-x'"),
    ("alpine@sha256:abc", "the digest"), ("bad_host:x:1/app", "not a registry host"),
    ("a/" * 200 + "b", "longer than 255"),
])
def test_bad_references_name_the_problem(text, why):
    with pytest.raises(ConfigError, match=why):
        parse_reference(text)


component = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,4})?", fullmatch=True)
host = st.one_of(st.just("docker.io"), st.just("localhost:5000"),
                 st.from_regex(r"[a-z]{1,8}\.(?:io|com)(?::[0-9]{2,5})?", fullmatch=True))
tag = st.from_regex(r"\w[\w.-]{0,20}", fullmatch=True).filter(str.isascii)
digest = st.from_regex(r"[0-9a-f]{64}", fullmatch=True).map(lambda hex_: f"sha256:{hex_}")


@given(host, st.lists(component, min_size=2, max_size=4), st.one_of(st.just(""), tag),
       st.one_of(st.just(""), digest))
def test_a_normalised_reference_parses_to_itself(registry, path, tag_, digest_):
    reference = Reference(registry, "/".join(path), tag_ or ("" if digest_ else "latest"),
                          digest_)
    assert parse_reference(str(reference)) == reference


@given(st.text(max_size=80))
def test_any_text_parses_or_says_why(text):
    try:
        parse_reference(text)
    except ConfigError as error:
        assert str(error).startswith("image reference ")


@pytest.mark.parametrize("text, expected", [
    ("linux/amd64", "linux/amd64"), ("Linux/ARM64/v8", "linux/arm64"),
    ("linux/arm/v7", "linux/arm/v7")])
def test_platforms(text, expected):
    assert normalize_platform(text) == expected


def test_a_bad_platform_says_how_to_spell_one():
    with pytest.raises(ConfigError, match="os/architecture"):
        normalize_platform("amd64")
