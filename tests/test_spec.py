"""Validation at the edge: sizes, CPU counts and the spec, property-tested where it pays."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_minictr import ConfigError, ContainerSpec, Mount, parse_size
from pytest_minictr.spec import make_spec, parse_cpus

UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
         "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4}


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(sorted(UNITS)),
       st.booleans())
def test_sizes_with_units(number, unit, upper):
    text = f"{number}{unit.upper() if upper else unit}"
    assert parse_size(text) == number * UNITS[unit]


@given(st.integers(min_value=1))
def test_int_sizes_are_bytes(number):
    assert parse_size(number) == number


@given(st.text())
def test_any_string_gives_a_size_or_a_config_error(text):
    try:
        assert parse_size(text, "memory") > 0
    except ConfigError as error:
        assert "memory=" in str(error)


@pytest.mark.parametrize("value, message", [
    ("64Q", "unknown unit 'Q'"), ("-1M", "not a size"), (0, "must be positive"),
    (-5, "must be positive"), (True, "expected bytes"), (1.5, "expected bytes"),
    ("", "not a size"), ("0.1b", "must be positive"),
])
def test_bad_sizes_name_the_problem(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_size(value, "memory")


def test_fractional_sizes_round_down():
    assert parse_size("1.5G") == 1536 * 1024**2


@given(st.floats(min_value=0.01, max_value=1.0))
def test_cpus_are_percent_of_one_cpu(cpus):
    assert math.isclose(parse_cpus(cpus), cpus * 100)


@pytest.mark.parametrize("value", ["lots", -1, 0, float("nan"), float("inf"), 10**6, True])
def test_bad_cpus_raise(value):
    with pytest.raises(ConfigError, match="cpus="):
        parse_cpus(value)


@given(env=st.dictionaries(st.text(min_size=1), st.text(), max_size=5))
def test_env_is_accepted_or_rejected_by_name(env):
    root = "/"
    bad = [k for k, v in env.items() if "=" in k or "\0" in k or "\0" in v]
    if bad:
        with pytest.raises(ConfigError, match="env"):
            make_spec(root, ["x"], env=env)
    else:
        assert set(env.items()) <= set(make_spec(root, ["x"], env=env).env)


def test_spec_survives_the_trip_to_the_launcher(tmp_path):
    spec = make_spec(tmp_path, ["sh", "-c", "true"], env={"A": "1"}, timeout=2,
                     mounts=[Mount.bind(tmp_path, "/data"), Mount.tmpfs("/scratch", "1M")])
    assert ContainerSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("kwargs, message", [
    ({"cwd": "relative"}, "cwd='relative'"),
    ({"mounts": [Mount.bind("/no/such/path", "/x")]}, "does not exist on the host"),
    ({"mounts": [Mount.tmpfs("/")]}, "cannot mount over the container's root"),
    ({"mounts": ["/tmp"]}, "expected Mount.bind"),
    ({"user": "yes"}, "user='yes'"),
    ({"output_limit": "1Z"}, "output_limit='1Z'"),
    ({"command": ["sh", 3]}, "command item 3"),
])
def test_spec_errors_name_the_keyword(tmp_path, kwargs, message):
    arguments = {"command": ["sh"], **kwargs}
    with pytest.raises(ConfigError, match=message):
        make_spec(tmp_path, **arguments)
