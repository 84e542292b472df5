"""Validation at the edge: sizes, CPU counts and the spec, property-tested where it pays."""

from __future__ import annotations

import math
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_minictr import ConfigError, ContainerSpec, Mount, parse_size
from pytest_minictr.confinement import UNLIMITED
from pytest_minictr.keywords import check_marker_names, make_spec
from pytest_minictr.sizes import MAX_SIZE
from pytest_minictr.validate import MAX_SECONDS, check_seconds, parse_cpus

UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
         "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4}


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(sorted(UNITS)),
       st.booleans())
def test_sizes_with_units(number, unit, upper):
    text = f"{number}{unit.upper() if upper else unit}"
    assert parse_size(text) == number * UNITS[unit]


@given(st.integers(min_value=1, max_value=MAX_SIZE))
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
    assert parse_size("1.0009K") == 1024


def test_sizes_are_exact_and_bounded():
    # exact past 2**53, where a float would have rounded the byte count
    assert parse_size("9007199254740993") == 2**53 + 1
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    for too_big in (MAX_SIZE + 1, "4194305T", "9" * 400, "9" * 5000):  # no OverflowError
        with pytest.raises(ConfigError, match=r"output_limit=.*at most 2\*\*62"):
            parse_size(too_big, "output_limit")


@given(st.floats(min_value=0.01, max_value=1.0))
def test_cpus_are_a_number_of_cpus(cpus):
    assert math.isclose(parse_cpus(cpus), cpus)
    assert math.isclose(make_spec("/", ["x"], cpus=cpus).limits.cpus, cpus)
    assert math.isclose(make_spec("/", ["x"], cpu_limit=cpus * 100).limits.cpus, cpus)


@pytest.mark.parametrize("value", ["lots", -1, 0, float("nan"), float("inf"), 10**6, True,
                                   10**400])
def test_bad_cpus_raise(value):
    with pytest.raises(ConfigError, match="cpus="):
        parse_cpus(value)
    with pytest.raises(ConfigError, match="cpu_limit="):
        make_spec("/", ["x"], cpu_limit=value)


def test_a_cpus_error_speaks_in_cpus_and_a_cpu_limit_error_in_percent():
    with pytest.raises(ConfigError, match=r"^cpus=-1: must be at least 0\.01 CPUs \(0\.5 is "
                                          r"half of one\)$"):
        make_spec("/", ["x"], cpus=-1)
    with pytest.raises(ConfigError, match=r"^cpu_limit=-1: must be at least 1 \(percent of "
                                          r"one CPU\)$"):
        make_spec("/", ["x"], cpu_limit=-1)


def test_seconds_are_positive_finite_and_at_most_max_seconds():
    assert MAX_SECONDS == 10**6
    assert check_seconds(MAX_SECONDS, "timeout") == float(MAX_SECONDS)
    assert check_seconds(0.5, "grace") == 0.5
    assert check_seconds(0, "grace", allow_zero=True) == 0.0
    assert make_spec("/", ["x"], timeout=None).timeout is None
    assert make_spec("/", ["x"], timeout=3).timeout == 3.0


@pytest.mark.parametrize("value, message", [
    (1e10, "at most 1000000 seconds"), (10**400, "at most 1000000 seconds"),
    (MAX_SECONDS + 0.5, "at most"), (float("inf"), "at most"),
    (float("nan"), "expected a positive number"), (-1, "expected a positive number"),
    (0, "expected a positive number"), (True, "expected"), ("5", "expected"),
])
def test_bad_seconds_name_the_keyword_and_the_bound(value, message):
    with pytest.raises(ConfigError, match=re.escape(f"timeout={value!r}") + ".*" + message):
        make_spec("/", ["x"], timeout=value)
    with pytest.raises(ConfigError, match="grace="):
        check_seconds(value if value != 0 else -0.1, "grace", allow_zero=True)


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
    (tmp_path / "root").mkdir()
    (tmp_path / "layer").mkdir()
    spec = make_spec(tmp_path / "root", ["sh", "-c", "true"], env={"A": "1"}, timeout=2,
                     mounts=[Mount.bind(tmp_path, "/data"), Mount.tmpfs("/scratch", "1M"),
                             Mount.bind(tmp_path, "/rw", read_only=False), Mount.tmpfs("/t")],
                     memory_limit="64M", pids_limit=64, layer=tmp_path / "layer")
    assert ContainerSpec.from_dict(spec.to_dict()) == spec


# A lone surrogate is a valid str that os.fsencode() cannot turn into bytes for the kernel.
LONE = "\ud800"


@pytest.mark.parametrize("kwargs, keyword", [
    ({"command": ["sh", LONE]}, "command[1]"),
    ({"command": [LONE]}, "command[0]"),
    ({"env": {LONE: "x"}}, "env name"),
    ({"env": {"A": "x" + LONE}}, "env['A']"),
    ({"cwd": "/" + LONE}, "cwd"),
    ({"hostname": LONE}, "hostname"),
    ({"mounts": [Mount.tmpfs("/" + LONE)]}, "mount target"),
    ({"mounts": [Mount.bind("/" + LONE, "/x")]}, "mount source"),
    ({"layer": "/tmp/" + LONE}, "layer"),
    ({"image": "/" + LONE}, "image"),
])
def test_strings_the_kernel_cannot_take_are_config_errors(tmp_path, kwargs, keyword):
    arguments = {"image": tmp_path, "command": ["sh"], **kwargs}
    with pytest.raises(ConfigError, match=re.escape(keyword)) as info:
        make_spec(arguments.pop("image"), **arguments)
    assert "\\ud800" in str(info.value)
    if keyword != "hostname":  # its ASCII pattern already says what is allowed
        assert "cannot be encoded for the kernel" in str(info.value)


def test_undecodable_bytes_from_the_filesystem_are_fine(tmp_path):
    name = os.fsdecode(b"caf\xe9")  # '\udce9' by surrogateescape: os.fsencode() takes it back
    (tmp_path / name).mkdir()
    spec = make_spec(tmp_path / name, ["sh", name], env={"F": name}, cwd="/" + name)
    assert spec.argv[1] == spec.cwd[1:] == name


@pytest.mark.parametrize("mount, message", [
    (Mount(target="/x", size=-5), r"mount size=-5 \(on '/x'\): expected a positive int"),
    (Mount(target="/x", source=None, read_only=False, size=0), "mount size=0"),
    (Mount(target="/x", read_only=False, size="16M"), r"Mount.tmpfs\('/x', size='16M'\)"),
    (Mount(target="/x", read_only=False, size=True), "mount size=True"),
    (Mount(target="/x", read_only=False, size=2**63), "at most 2\\*\\*62"),
    (Mount(target="/x", source="/etc", read_only="no"), "mount read_only='no'.*True or False"),
    (Mount(target="/x", source="/etc", read_only=0), "mount read_only=0"),
    (Mount(target="/x", source="/etc", size=4096), "mount size=4096.*only a tmpfs has a size"),
    (Mount(target="/x"), r"read_only=True \(on '/x'\): a tmpfs .* use Mount.tmpfs\('/x'\)"),
    (Mount.tmpfs("/a/../../x"), r"mount target '/a/../../x': '..' is not allowed.*'/x'"),
    (Mount.bind("/etc", "/data/.."), "'..' is not allowed"),
    (Mount.tmpfs("/proc"), "mount target '/proc': is /proc, which the container gets"),
    (Mount.tmpfs("/proc/sys"), "'/proc/sys': is inside /proc"),
    (Mount.bind("/etc", "//proc/sys"), "'//proc/sys': is inside /proc"),
    (Mount.tmpfs("/dev"), "is /dev"),
    (Mount.bind("/etc", "/dev/shm/x"), "is inside /dev"),
    (Mount.tmpfs("/tmp/"), r"is /tmp.*below /tmp is fine"),
    (Mount.tmpfs("/tmp/.."), "'..' is not allowed"),
])
def test_bad_mounts_are_config_errors(mount, message):
    with pytest.raises(ConfigError, match=message):
        make_spec("/", ["x"], mounts=[mount])


def test_good_mounts_are_normalized():
    mounts = make_spec("/", ["x"], mounts=[
        Mount.tmpfs("//tmp/data/", size="1M"), Mount.bind("/etc", "/procfs", read_only=False),
        Mount.tmpfs("/devices"), Mount(target="/y", source="/etc")]).mounts
    assert mounts == (Mount("/tmp/data", None, False, 1024**2),
                      Mount("/procfs", "/etc", False, None), Mount("/devices", None, False),
                      Mount("/y", "/etc", True, None))


def test_layer_must_not_overlap_the_rootfs(tmp_path):
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(root)
    (tmp_path / "layer").mkdir()
    for layer, where in [(root, "is the rootfs"), (tmp_path / "link", "is the rootfs"),
                         (root / "inner", "is inside the rootfs"),
                         (tmp_path, "contains the rootfs"), ("/", "contains the rootfs")]:
        with pytest.raises(ConfigError, match=re.escape(f"layer={str(layer)!r}: {where} "
                                                        f"(image={str(root)!r})")):
            make_spec(root, ["sh"], layer=layer)
    assert make_spec(root, ["sh"], layer=tmp_path / "layer").layer == str(tmp_path / "layer")
    assert make_spec(tmp_path / "link", ["sh"], layer=tmp_path / "layer").rootfs == str(root)


@pytest.mark.parametrize("kwargs, message", [
    ({"pids_limit": 4194304}, "pids_limit=4194304: must be at most 4194303 .*PID_MAX_LIMIT"),
    ({"pids_limit": 10**30}, "pids_limit=.*PID_MAX_LIMIT"),
    ({"memory_limit": 1}, r"memory_limit=1: must be at least 4 MiB \(4194304 bytes\)"),
    ({"memory_limit": "4095K"}, "memory_limit='4095K': must be at least 4 MiB"),
    ({"memory_limit": 2**62 + 1}, r"memory_limit=4611686018427387905: must be at most 2\*\*62"),
    ({"memory_limit": "5000000T"}, r"memory_limit='5000000T': must be at most 2\*\*62"),
])
def test_limits_the_kernel_would_refuse_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_spec("/", ["x"], **kwargs)


def test_limits_at_the_bounds_are_accepted():
    # 4194303: with the launcher's one more for the init, pids.max gets PID_MAX_LIMIT
    limits = make_spec("/", ["x"], pids_limit=4194303, memory_limit="4M").limits
    assert (limits.pids, limits.memory) == (4194303, 4 * 1024**2)
    assert make_spec("/", ["x"], memory_limit=2**62).limits.memory == 2**62


@pytest.mark.parametrize("kwargs, message", [
    ({"cwd": "relative"}, "cwd='relative'"),
    ({"mounts": [Mount.bind("/no/such/path", "/x")]}, "does not exist on the host"),
    ({"mounts": [Mount.tmpfs("/")]}, "cannot mount over the container's root"),
    ({"mounts": ["/tmp"]}, "expected Mount.bind"),
    ({"user": "yes"}, "user='yes'"),
    ({"output_limit": "1Z"}, "output_limit='1Z'"),
    ({"command": ["sh", 3]}, "command item 3"),
    ({"hostname": "minictr\n"}, "hostname='minictr\\\\n'"),
    ({"hostname": "-x"}, "hostname='-x'"),
    ({"seccomp": "off"}, "seccomp='off': expected True or False"),
    ({"allow_syscalls": "keyctl"}, "allow_syscalls='keyctl': expected a list"),
    ({"allow_syscalls": ["open"]}, "'open' is not a call the default seccomp filter denies"),
    ({"capabilities": ["SYS_EVERYTHING"]}, "'SYS_EVERYTHING' is not a capability"),
    ({"capabilities": [21]}, "21 is not a capability"),
    ({"rlimits": [("nofile", 1)]}, "rlimits=.*expected a dict"),
    ({"rlimits": {"nofiles": 1}}, "unknown limit 'nofiles'"),
    ({"rlimits": {"nofile": -1}}, "nofile=-1: expected a number"),
    ({"rlimits": {"nofile": 2**63}}, "expected a number from 0 to 2\\*\\*63"),
    ({"rlimits": {"nofile": True}}, "nofile=True"),
    ({"rlimits": {"nofile": (2, 1)}}, "the soft limit exceeds the hard one"),
    ({"rlimits": {"nofile": (1, 2, 3)}}, "nofile=\\(1, 2, 3\\)"),
])
def test_spec_errors_name_the_keyword(tmp_path, kwargs, message):
    arguments = {"command": ["sh"], **kwargs}
    with pytest.raises(ConfigError, match=message):
        make_spec(tmp_path, **arguments)


def test_security_keywords_become_one_value():
    security = make_spec("/", ["x"], capabilities=["cap_net_raw", "SYS_PTRACE"],
                         allow_syscalls=["keyctl"],
                         rlimits={"nofile": 10, "core": "unlimited", "stack": (1, None)}).security
    assert security.capabilities == ("NET_RAW", "SYS_PTRACE")
    assert security.allow_syscalls == ("keyctl",) and security.seccomp
    assert security.rlimits == (("nofile", 10, 10), ("core", UNLIMITED, UNLIMITED),
                                ("stack", 1, UNLIMITED))


def test_user_namespace_is_the_default():
    assert make_spec("/", ["x"]).user_namespace
    assert make_spec("/", ["x"], user=None).user_namespace


@pytest.mark.parametrize("marker, library, value", [
    ("memory", "memory_limit", "64M"), ("pids", "pids_limit", 32), ("cpus", "cpu_limit", 0.5),
])
def test_the_library_takes_the_markers_spelling_too(marker, library, value):
    # one schema: `memory=` means in ContainerRuntime.run() what it means on the marker
    library_value = 50 if library == "cpu_limit" else value  # percent of one CPU
    by_marker = make_spec("/", ["x"], **{marker: value}).limits
    assert by_marker == make_spec("/", ["x"], **{library: library_value}).limits
    with pytest.raises(ConfigError, match=f"{marker}=.* and {library}=.* both set {marker}: "
                                          "give one of them"):
        make_spec("/", ["x"], **{marker: value, library: library_value})


@pytest.mark.parametrize("typed, suggested", [
    ("memroy", "memory"), ("memory-limit", "memory_limit"), ("pid_limit", "pids_limit"),
    ("time_out", "timeout"), ("capability", "capabilities"),
])
def test_an_unknown_keyword_gets_a_did_you_mean_from_the_schema(typed, suggested):
    with pytest.raises(ConfigError, match=rf"unknown keyword {typed!r} \(did you mean "
                                          rf"{suggested!r}\?"):
        make_spec("/", ["x"], **{typed: 1})


@pytest.mark.parametrize("typed, suggested", [
    ("memory_limit", "memory"), ("pids_limit", "pids"), ("--cpus", "cpus"),
    ("cap_add", "capabilities"), ("ulimit", "rlimits"), ("cwd", None),
])
def test_the_marker_suggests_its_own_spelling(typed, suggested):
    hint = rf"did you mean {suggested!r}\? " if suggested else ""
    with pytest.raises(ConfigError, match=rf"^@pytest.mark.container: unknown keyword "
                                          rf"{typed!r} \({hint}known: memory, cpus"):
        check_marker_names([typed])


def test_a_marker_only_keyword_in_the_library_says_where_it_goes():
    with pytest.raises(ConfigError, match=r"unknown keyword 'binaries'.*RootfsBuilder\(\)"
                                          r"\.build\(binaries="):
        make_spec("/", ["x"], binaries=["sh"])


@pytest.mark.needs_limits
def test_run_with_the_markers_memory_spelling_is_enforced(runtime, rootfs):
    result = runtime.run(rootfs, ["sh", "-c", 'a=x; while :; do a="$a$a"; done'],
                         memory="32M", pids=32, timeout=60).wait()
    assert result.oom_killed is True and result.memory_peak <= 33 * 1024**2
