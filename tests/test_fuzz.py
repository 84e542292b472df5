"""Bad input, fuzzed: every public entry point answers a wrong value with a `MinictrError`
that names it (or, for the CLI, an argparse usage error, or one `minictr: error:` line),
never another exception type, a traceback, a hang or a leftover.

Most of the suite calls the validating functions in-process (`make_spec`, `parse_size`,
`Mount.*`, the marker's and the options' checks of the keyword schema, `RootfsBuilder.build`): no
container, thousands of examples a second. A few tests go through a real runtime or `main()`
of the CLI, with few examples, since every valid one starts a container.

A shrunk counterexample that showed a real bug stays below as an `@example`.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_minictr import MinictrError, RootfsBuilder, confinement, keywords, validate
from pytest_minictr.caller.result import Result
from pytest_minictr.confinement import FILTERED
from pytest_minictr.images.transport import RegistryError
from pytest_minictr.keywords import make_exec_spec, make_spec
from pytest_minictr.sizes import MAX_SIZE, parse_size
from pytest_minictr.spec import ContainerSpec, Mount
from pytest_minictr.validate import MIN_MEMORY

# the module: `pytest_minictr.cli` exports its function `main` under the same name
cli = importlib.import_module("pytest_minictr.cli.main")

# database=None: no example database written into the repository's .hypothesis/
FAST = settings(deadline=None, max_examples=150, database=None)
SLOW = settings(deadline=None, max_examples=25, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------
# Strategies

# Any code point, lone surrogates included, and the characters that break things most often.
NASTY = "\0\n\r\t =/.:-_~'\"\\$*\x7f\ud800\udcff\u00b2\u0661\u2028"
CHARS = st.one_of(st.characters(exclude_categories=[]), st.sampled_from(NASTY))
TEXT = st.text(CHARS, max_size=30)
HUGE = "x" * 2 ** 20
HUGE_INTS = st.sampled_from([2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 400, -10 ** 400])
NUMBERS = st.one_of(st.integers(), HUGE_INTS, st.floats(),
                    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
                    st.fractions(), st.decimals(), st.complex_numbers())
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, st.binary(max_size=8),
                    st.just(HUGE), st.builds(object), st.just(Path("/")))
HASHABLE = st.one_of(st.none(), st.booleans(), st.integers(), TEXT, st.binary(max_size=8))
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner), st.sets(HASHABLE, max_size=3),
    st.dictionaries(HASHABLE, inner, max_size=3)), max_leaves=6)

SIZES = st.one_of(
    st.from_regex(r"\A\s{0,2}[0-9]{0,25}(\.[0-9]{0,30})?\s{0,2}[kKmMgGtTiIbBxX]{0,3}\s{0,2}\Z"),
    st.builds(lambda zeros, rest: "0" * zeros + rest, st.integers(0, 6000),
              st.sampled_from(["", "1", "64M", ".5G", "1" * 30])),
    st.integers(-2 ** 64, 2 ** 64), HUGE_INTS, TEXT, JUNK)
CPU_TEXT = st.one_of(
    st.from_regex(r"\A\s?[+-]?[0-9_]{0,20}(\.[0-9]{0,20})?([eE][+-]?[0-9]{1,4})?\s?\Z"),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-1e400", "0x10", "1" * 5000]))
CPUS = st.one_of(CPU_TEXT, NUMBERS, TEXT, JUNK)
SECONDS = st.one_of(NUMBERS, TEXT, JUNK)
PIDS = st.one_of(st.integers(-10, 5_000_000), HUGE_INTS,
                 st.from_regex(r"\A\s?[0-9²١]{0,8}\s?\Z"),  # noqa: RUF001 - digits int() takes
                 st.just("1" * 5000), NUMBERS, TEXT, JUNK)

CONTAINER_PATHS = st.one_of(
    st.sampled_from(["/", "/tmp", "/tmp/x", "/proc", "/proc/x", "//proc", "/dev", "/dev/x",
                     "/a/../proc", "/a/./b", "/data", "relative", "", "/a\nb", "/a b",
                     "/\ud800", "/a\0b", "/\udcff", "/" + "x" * 5000]),
    st.builds("/".__add__, TEXT), TEXT, JUNK)
HOSTNAMES = st.one_of(st.from_regex(r"\A[A-Za-z0-9.\-]{0,70}\n?\Z"), TEXT, JUNK)
NAMES = st.one_of(TEXT, st.sampled_from(["A=B", "=", "", "A\0", "\ud800", "PATH", "A B",
                                          "A\nB", "\udc80"]), HASHABLE)
VALUES = st.one_of(TEXT, st.just(HUGE), st.just(HUGE + "\0"), st.sampled_from(["", "\ud800"]),
                   JUNK)
ENVS = st.one_of(st.dictionaries(NAMES, VALUES, max_size=4), JUNK)
ARGS = st.one_of(TEXT, st.sampled_from(["", "\0", "\ud800", "sh", "/bin/sh"]), st.just(HUGE),
                 SCALARS)
COMMANDS = st.one_of(st.lists(ARGS, max_size=4), st.tuples(ARGS), st.just([]),
                     st.just(["true"] * 100_000), TEXT, st.binary(), JUNK)
SYSCALLS = st.one_of(st.lists(st.one_of(st.sampled_from(FILTERED), TEXT, SCALARS), max_size=3),
                     JUNK)
CAP_NAMES = st.sampled_from(confinement.CAPABILITY_NAMES)
CAPABILITIES = st.one_of(st.lists(st.one_of(
    CAP_NAMES, CAP_NAMES.map(str.lower), CAP_NAMES.map("CAP_".__add__), TEXT, SCALARS),
    max_size=3), JUNK)
RLIMIT_VALUES = st.one_of(st.integers(-2, 2 ** 64), st.sampled_from(["unlimited", None]),
                          HUGE_INTS, SCALARS)
RLIMITS = st.one_of(st.dictionaries(
    st.one_of(st.sampled_from(sorted(confinement.RLIMIT_NAMES)), HASHABLE),
    st.one_of(RLIMIT_VALUES, st.tuples(RLIMIT_VALUES, RLIMIT_VALUES),
              st.lists(RLIMIT_VALUES, max_size=3)), max_size=3), JUNK)

# (kind, target, source or size, read_only): made into a Mount inside the test, where an
# exception from Mount.bind()/Mount.tmpfs() themselves counts too.
MOUNT_RECIPES = st.tuples(st.sampled_from(["bind", "tmpfs", "raw"]), CONTAINER_PATHS,
                          st.one_of(st.sampled_from(["tree", "/tmp", "/nonexistent"]), SIZES),
                          st.one_of(st.booleans(), JUNK))


def nested_paths(tree: Path):
    """Host paths of the `tree` fixture, absolute and relative to it, and odd ones."""
    names = sorted(p.name for p in tree.iterdir())
    return st.one_of(
        st.builds(lambda name, suffix, absolute: (str(tree / name) if absolute else name)
                  + suffix, st.sampled_from(names),
                  st.sampled_from(["", "/", "/.", "/..", "/x", "//", "/upper"]), st.booleans()),
        st.sampled_from(["", ".", "..", "/", "/nonexistent", "relative/dir", "/" + "x" * 300,
                         "/x" * 3000, "~", "~nosuchuser", "/dev/null", "/proc/self/fd/0"]),
        st.builds(Path, st.sampled_from(names)),
        TEXT, JUNK)


@pytest.fixture(scope="module", autouse=True)
def no_registry():
    """A string that names no directory is an image reference: the fuzz tests reach no
    registry (the registry tests do, on loopback)."""
    def pull(reference, *args, **kwargs):
        raise RegistryError("no registry in the fuzz tests")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pytest_minictr.images.pull.pull", pull)
        yield


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Paths to be wrong with: a symlink loop, a file where a dir belongs, a dangling link,
    names with spaces and newlines, an empty dir; "root" is a (fake) rootfs dir."""
    top = tmp_path_factory.mktemp("fuzz-tree")
    for directory in ("root", "layer", "empty", "with space", "new\nline", "root/sub"):
        (top / directory).mkdir()
    (top / "root" / "bin").mkdir()
    (top / "file").write_text("not a directory\n")
    (top / "with space" / "file").write_text("x")
    (top / "loop").symlink_to("loop")
    (top / "loop_a").symlink_to("loop_b")
    (top / "loop_b").symlink_to("loop_a")
    (top / "dangling").symlink_to("nonexistent")
    (top / "to_root").symlink_to("root")
    (top / "to_file").symlink_to("file")
    return top


def answer(call, *names: str):
    """call()'s value; or None where it raised a MinictrError whose message names one of
    `names`. Any other exception goes through, and fails the test (hypothesis shrinks it)."""
    try:
        return call()
    except MinictrError as error:
        message = str(error)
        assert any(name in message for name in names), f"{message!r} names none of {names}"
        return None


def make_mount(kind: str, target, other, read_only, tree: Path):
    source = str(tree / "root") if other == "tree" else other
    if kind == "bind":
        return Mount.bind(source, target, read_only)
    if kind == "tmpfs":
        return Mount.tmpfs(target, None if other in ("tree", "/tmp", "/nonexistent") else other)
    return Mount(target=target, source=source, read_only=read_only, size=other)


# ---------------------------------------------------------------------------------------------
# Sizes, CPUs, seconds

@FAST
@given(value=SIZES, name=st.sampled_from(["memory_limit", "output_limit", "tmpfs size"]))
@example(value="0" * 4300 + "1", name="memory_limit")  # int() refused 4300+ digits
def test_parse_size(value, name):
    size = answer(lambda: parse_size(value, name), name)
    assert size is None or (type(size) is int and 0 < size <= MAX_SIZE)


@FAST
@given(value=SIZES)
def test_memory_limit(value):
    size = answer(lambda: validate.check_memory_limit(value), "memory_limit")
    assert size is None or MIN_MEMORY <= size <= MAX_SIZE


@FAST
@given(value=CPUS)
def test_parse_cpus(value):
    cpus = answer(lambda: validate.parse_cpus(value, "--cpus"), "--cpus")
    assert cpus is None or (type(cpus) is float and 0.01 <= cpus <= os.cpu_count())


@FAST
@given(value=st.one_of(SECONDS, st.integers(), HUGE_INTS), allow_zero=st.booleans(),
       name=st.sampled_from(["timeout", "grace"]))
def test_check_seconds(value, allow_zero, name):
    seconds = answer(lambda: validate.check_seconds(value, name, allow_zero), name)
    assert seconds is None or (0 <= seconds <= validate.MAX_SECONDS and (allow_zero or seconds))


# ---------------------------------------------------------------------------------------------
# make_spec: every keyword of ContainerRuntime.run()

KEYWORDS = {
    "cpu_limit": st.one_of(NUMBERS, st.integers(-10, 10_000), JUNK),
    "memory_limit": SIZES, "output_limit": SIZES, "layer_size": SIZES,
    "pids_limit": PIDS, "timeout": SECONDS, "env": ENVS, "cwd": CONTAINER_PATHS,
    "hostname": HOSTNAMES,
    "network": st.one_of(st.sampled_from((*validate.NETWORK_MODES, "host", "None", "")), JUNK),
    "user": st.one_of(st.booleans(), JUNK), "seccomp": st.one_of(st.booleans(), JUNK),
    "allow_syscalls": SYSCALLS, "capabilities": CAPABILITIES, "rlimits": RLIMITS,
}
# What a message says for each keyword: its name, or how it names an item of it.
NAMED = {"env": ("env",), "mounts": ("mount",), "rlimits": ("rlimits",),
         "allow_syscalls": ("allow_syscalls",), "capabilities": ("capabilities",)}


@FAST
@given(data=st.data(), keyword=st.sampled_from(sorted(KEYWORDS)))
@example(data=None, keyword=("cpu_limit", -10 ** 400))  # float() overflowed
@example(data=None, keyword=("env", {"A": HUGE}))        # E2BIG, late, at exec
def test_make_spec_keyword(tree, data, keyword):
    if data is None:
        keyword, value = keyword
    else:
        value = data.draw(KEYWORDS[keyword], label=keyword)
    made = answer(lambda: make_spec(tree / "root", ["true"], **{keyword: value}),
                  *NAMED.get(keyword, (keyword,)))
    assert made is None or isinstance(made, ContainerSpec)


@FAST
@given(keywords=st.fixed_dictionaries({}, optional=KEYWORDS))
def test_make_spec_keywords_together(tree, keywords):
    names = [n for keyword in keywords for n in NAMED.get(keyword, (keyword,))]
    made = answer(lambda: make_spec(tree / "root", ["true"], **keywords), *names)
    assert made is None or isinstance(made, ContainerSpec)


@FAST
@given(command=COMMANDS)
@example(command=["true", HUGE])  # E2BIG, late, at exec
def test_command(tree, command):
    made = answer(lambda: make_spec(tree / "root", command), "command")
    if made is not None:
        assert made.argv and all(isinstance(arg, str) for arg in made.argv)


@FAST
@given(env=ENVS)
@example(env={"A=B": "1"})
@example(env={"A": "\0"})
@example(env={"\ud800": "1"})
def test_env(tree, env):
    made = answer(lambda: make_spec(tree / "root", ["true"], env=env), "env")
    if made is not None:
        assert all("=" not in name and "\0" not in name + value for name, value in made.env)


@FAST
@given(mounts=st.lists(MOUNT_RECIPES, max_size=3) | JUNK)
@example(mounts=[("bind", "/data", None, True)])  # os.fspath(None): TypeError
def test_mounts(tree, mounts):
    def call():
        made = [make_mount(*m, tree) if isinstance(m, tuple) and len(m) == 4
                and m[0] in ("bind", "tmpfs", "raw") else m for m in mounts] \
            if isinstance(mounts, list) else mounts
        return make_spec(tree / "root", ["true"], mounts=made)
    made = answer(call, "mount", "tmpfs size")
    if made is not None:
        for mount in made.mounts:
            assert mount.target.startswith("/") and mount.target != "/"


@FAST
@given(data=st.data(), where=st.sampled_from(["image", "layer", "cwd", "source", "target"]))
def test_paths(tree, data, where):
    path = data.draw(nested_paths(tree), label="path")
    image = path if where == "image" else tree / "root"
    keywords = {"layer": path} if where == "layer" else {"cwd": path} if where == "cwd" else {}
    mounts = [Mount.bind(path, "/data")] if where == "source" and isinstance(
        path, (str, os.PathLike)) else [Mount.bind(tree / "file", path)] \
        if where == "target" else []
    made = answer(lambda: make_spec(image, ["true"], mounts=mounts, **keywords),
                  {"source": "mount", "target": "mount"}.get(where, where))
    if made is not None:
        assert os.path.isdir(made.rootfs)
        assert made.layer is None or os.path.isdir(made.layer)


@FAST
@given(command=COMMANDS, env=ENVS, timeout=SECONDS | st.none())
def test_make_exec_spec(tree, command, env, timeout):
    base = make_spec(tree / "root", ["true"], env={"KEPT": "1"})
    made = answer(lambda: make_exec_spec(base, command, env, timeout),
                  "command", "env", "timeout")
    if made is not None:
        assert dict(made.env)["KEPT"] == "1" or "KEPT" in (env or {})


@FAST
@given(seccomp=st.one_of(st.booleans(), JUNK), allow_syscalls=SYSCALLS,
       capabilities=CAPABILITIES, rlimits=RLIMITS | st.none())
def test_check_security(tree, seccomp, allow_syscalls, capabilities, rlimits):
    made = answer(lambda: make_spec(tree / "root", ["true"], seccomp=seccomp,
                                         allow_syscalls=allow_syscalls,
                                         capabilities=capabilities, rlimits=rlimits),
                  "seccomp", "allow_syscalls", "capabilities", "rlimits")
    if made is not None:
        for _, soft, hard in made.security.rlimits:
            assert hard == confinement.UNLIMITED or soft <= hard


# ---------------------------------------------------------------------------------------------
# The marker's keywords and the plugin's options

MARKER = {"memory": SIZES, "cpus": CPUS, "pids": PIDS, "timeout": SECONDS,
          "network": KEYWORDS["network"], "binaries": st.one_of(st.lists(ARGS, max_size=3), JUNK),
          "recipe": st.one_of(st.sampled_from(["minimal", "busybox", "x.toml", "/x/y"]),
                              st.text(CHARS, max_size=30), JUNK),
          "hostname": HOSTNAMES, "env": ENVS, "user": st.one_of(st.booleans(), JUNK)}


@FAST
@given(data=st.data(), keyword=st.sampled_from([*MARKER, "rootfs"]))
@example(data=None, keyword=("pids", "\u00b2"))           # int('²'): ValueError
@example(data=None, keyword=("pids", "1" * 5000))         # int() refused 4300+ digits
@example(data=None, keyword=("rootfs", "~nosuchuser"))    # expanduser(): RuntimeError
@example(data=None, keyword=("rootfs", "/x" * 3000))      # is_dir(): ENAMETOOLONG
@example(data=None, keyword=("rootfs", "~\ud800"))        # expanduser(): UnicodeEncodeError
@example(data=None, keyword=("rootfs", "~\0"))            # expanduser(): ValueError
@example(data=None, keyword=("recipe", "x" * 300))        # recipes.find(): ENAMETOOLONG
def test_marker_value(tree, data, keyword):
    if data is None:
        keyword, value = keyword
    elif keyword == "rootfs":
        value = data.draw(nested_paths(tree), label="rootfs")
    else:
        value = data.draw(MARKER[keyword], label=keyword)
    answer(lambda: keywords.check_marker_value(keyword, value), keyword)


@FAST
@given(security_keywords=st.fixed_dictionaries({}, optional={
    "seccomp": KEYWORDS["seccomp"], "allow_syscalls": SYSCALLS,
    "capabilities": CAPABILITIES, "rlimits": RLIMITS}))
def test_marker_security(security_keywords):
    answer(lambda: [keywords.check_marker_value(name, value)
                    for name, value in security_keywords.items()], *security_keywords)


@FAST
@given(data=st.data(), option=st.sampled_from(["memory", "pids", "seconds", "rootfs"]))
def test_plugin_options(tree, data, option):
    """--minictr-memory/-pids/-timeout/-rootfs (or MINICTR_*, ini): always strings.
    pytest_configure() turns a ConfigError into a usage error; anything else is a traceback."""
    text = data.draw(st.one_of(TEXT, SIZES.filter(lambda v: isinstance(v, str)),
                               CPU_TEXT, st.from_regex(r"\A\s?[0-9²]{0,6}\s?\Z"))
                     if option != "rootfs" else nested_paths(tree).map(str))
    keyword = keywords.BY_NAME[{"seconds": "timeout"}.get(option, option)]
    answer(lambda: keywords.check_text(keyword, text, "--minictr-x"), "--minictr-x")


# ---------------------------------------------------------------------------------------------
# RootfsBuilder paths

@settings(SLOW, max_examples=60)
@given(data=st.data(), kind=st.sampled_from(["files", "dirs", "dest", "binaries"]))
def test_rootfs_builder_paths(tree, tmp_path_factory, monkeypatch, data, kind):
    """Relative paths resolve in a scratch cwd; a build that fails leaves no dest behind."""
    scratch = tmp_path_factory.mktemp("builds")
    monkeypatch.chdir(scratch)
    paths = nested_paths(tree)
    if kind == "dest":  # never build into a real directory of the host (/nonexistent...)
        paths = paths.filter(lambda p: not isinstance(p, (str, Path)) or not os.path.isabs(p)
                             or Path(p).is_relative_to(tree))
    value = data.draw(st.one_of(st.lists(paths, max_size=2), paths), label=kind)
    dest = value if kind == "dest" else scratch / "dest"
    keywords = {"dest": dest} if kind == "dest" else {kind: value, "dest": dest}
    before = set(os.listdir(scratch))
    built = answer(lambda: RootfsBuilder(cache_dir=scratch / "cache").build(**keywords),
                   kind, "dest", "binar", "file", "dir", "librar")
    if built is None:
        assert set(os.listdir(scratch)) <= before | {"cache"}, "a failed build left files"


@pytest.mark.parametrize("recipe", ["x" * 300, "/x" * 3000])
def test_rootfs_builder_recipe_name_too_long(tmp_path, recipe):
    answer(lambda: RootfsBuilder(cache_dir=tmp_path).build(recipe=recipe), "recipe")


# ---------------------------------------------------------------------------------------------
# Through a real runtime: what make_spec() cannot check (input/stdin/stdout/stderr), and
# values that are valid on paper

@pytest.fixture
def devnull():
    with open(os.devnull, "rb+") as file:
        yield file


def streams(devnull_file):
    closed = open(os.devnull)
    closed.close()
    return st.one_of(
        st.none(), st.sampled_from([devnull_file, devnull_file.fileno(), closed, sys, -1,
                                    True, 3.0, "stdout", b"", 2 ** 31 - 1]),
        st.integers(-2 ** 31, 2 ** 31 - 1), JUNK)


@pytest.mark.usefixtures("no_leftovers")
@SLOW
@given(data=st.data())
def test_run_streams(runtime, rootfs, devnull, data):
    io = data.draw(st.fixed_dictionaries({}, optional={
        "input": st.one_of(st.binary(max_size=8), st.just(bytearray(b"x")),
                           st.just(memoryview(b"y")), TEXT, JUNK),
        "stdin": streams(devnull), "stdout": streams(devnull), "stderr": streams(devnull)}))
    container = answer(lambda: runtime.run(rootfs, ["true"], **io),
                       "input", "stdin", "stdout", "stderr")
    if container is not None:
        assert isinstance(container.wait(timeout=30), Result)


@pytest.mark.usefixtures("no_leftovers")
def test_run_stream_fd_past_int_range(runtime, rootfs):
    answer(lambda: runtime.run(rootfs, ["true"], stdout=2 ** 31), "stdout")


VALID_ISH = {
    "memory_limit": st.sampled_from(["4M", "64M", 4 * 2 ** 20, "1G"]),
    "cpu_limit": st.sampled_from([1, 50, 100.0]), "pids_limit": st.integers(1, 64),
    "timeout": st.sampled_from([1e-6, 0.01, 5, 30.0]), "output_limit": st.sampled_from(
        [1, "1K", 10 ** 6]),
    "env": st.dictionaries(st.from_regex(r"\A[A-Za-z_ \n.-]{1,8}\Z"),
                           st.text(st.characters(exclude_characters="\0"), max_size=20)
                           | st.sampled_from(["\udcff", "x" * 100_000]), max_size=3),
    "cwd": st.sampled_from(["/", "/bin", "/tmp", "/nonexistent", "/a\nb", "/bin/true"]),
    "hostname": st.sampled_from(["a", "a-b.c", "x" * 63]),
    "network": st.sampled_from(validate.NETWORK_MODES),
    "user": st.sampled_from([True, False, None]),
    "seccomp": st.booleans(), "allow_syscalls": st.lists(st.sampled_from(FILTERED), max_size=2),
    "capabilities": st.lists(CAP_NAMES, max_size=2),
    "rlimits": st.dictionaries(st.sampled_from(sorted(confinement.RLIMIT_NAMES)),
                               st.sampled_from([0, 1, 1024, "unlimited", (0, 1)]), max_size=2),
    "layer_size": st.sampled_from(["4M", "64M"]),
    "mounts": st.lists(st.sampled_from([Mount.tmpfs("/tmp/t"), Mount.tmpfs("/data", "4M"),
                                        Mount.bind("/etc", "/mnt/etc")]), max_size=2),
}


@pytest.mark.usefixtures("no_leftovers")
@SLOW
@given(keywords=st.fixed_dictionaries({}, optional=VALID_ISH),
       command=st.sampled_from([["true"], ["sh", "-c", "exit 3"], ["nonexistent"], ["/"],
                                ["/bin/true", "x" * 100_000], ["true"] + ["x"] * 30_000]))
def test_run_keywords_valid_on_paper(runtime, rootfs, keywords, command):
    """Values make_spec() takes must run, or fail with a MinictrError: not another type."""
    try:
        result = runtime.run(rootfs, command, **keywords).wait(timeout=30)
    except MinictrError:
        return
    assert isinstance(result, Result)


# ---------------------------------------------------------------------------------------------
# The CLI, in-process

def test_cli_recipe_name_too_long(capfd):
    cli_answer(["run", "--recipe", "x" * 300, "--", "true"], capfd)


RUN_OPTIONS = {
    "--memory": SIZES, "--cpus": CPUS, "--pids": PIDS, "--timeout": SECONDS,
    "--network": KEYWORDS["network"], "--hostname": HOSTNAMES, "--cwd": CONTAINER_PATHS,
    "--env": st.one_of(st.builds("{}={}".format, NAMES, VALUES), TEXT),
    "--cap-add": CAPABILITIES, "--allow-syscall": SYSCALLS,
    "--ulimit": st.one_of(st.from_regex(r"\A[a-z]{0,7}=[0-9a-z]{0,12}(:[0-9a-z]{0,12})?\Z"),
                          st.builds("{}={}:{}".format, st.sampled_from(
                              sorted(confinement.RLIMIT_NAMES)), RLIMIT_VALUES, RLIMIT_VALUES),
                          TEXT),
    "--output-limit": SIZES, "--layer-size": SIZES,
}


def cli_answer(argv, capfd) -> int:
    """main(argv)'s status; checks the CLI's promises about stderr."""
    exited = False
    handlers = {signum: signal.getsignal(signum) for signum in cli.FORWARDED}
    try:
        status = cli.main(argv)
    except SystemExit as stop:
        exited, status = True, stop.code
        assert status in (0, 2), f"SystemExit({status!r})"
    finally:  # main() forwards these to its container: never leave this worker's changed
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    if exited:  # a usage error, or --help
        assert "usage: " in (err if status else out)
        return status
    assert isinstance(status, int) and not isinstance(status, bool)
    if status in (125, 126, 127):
        assert err.startswith("minictr: error: ") and err.count("\n") == 1, err
    return status


@pytest.mark.usefixtures("no_leftovers")
@SLOW
@given(option=st.sampled_from(sorted(RUN_OPTIONS)), data=st.data())
@example(option="--cwd", data=None)  # a newline in the launcher's message: two lines
def test_cli_run_option(rootfs, monkeypatch, capfd, devnull, option, data):
    monkeypatch.setattr(sys, "stdin", devnull)  # the test's stdin has no usable fileno()
    value = data.draw(RUN_OPTIONS[option], label=option) if data is not None else "/a\nb"
    # argv is strs; a list value gives the option once per item (as repeatable ones take)
    items = value if isinstance(value, list) else [value]
    argv = ["run", "--rootfs", str(rootfs)]
    for item in items:
        argv += [option, item if isinstance(item, str) else repr(item)]
    cli_answer([*argv, "--", "true"], capfd)


@SLOW
@given(argv=st.one_of(
    st.tuples(st.sampled_from(["logs", "stop", "kill", "stats", "rm", "exec"]),
              st.one_of(st.from_regex(r"\A[0-9a-f]{12}\Z"), TEXT)).map(list),
    st.tuples(st.just("kill"), st.from_regex(r"\A[0-9a-f]{12}\Z"),
              st.one_of(st.sampled_from(["TERM", "sigkill", "9", "0", "-9", "SIG_DFL", "\u00b2",
                                         "1" * 5000, "NSIG"]), TEXT)).map(list),
    st.tuples(st.just("stop"), st.just("--time"), TEXT | CPU_TEXT, TEXT).map(list),
    st.tuples(st.just("exec"), TEXT, st.sampled_from(["--env", "--timeout"]), TEXT,
              st.just("--"), TEXT).map(list),
    st.lists(TEXT, max_size=4).map(lambda args: ["rm", "-f", *args]),
    st.tuples(st.sampled_from(["rootfs", "doctor", "ps", "run", "exec", "stats"]),
              st.sampled_from(["--nonexistent", "--json", "--", "-h\0", ""]), TEXT).map(list),
    st.lists(TEXT, max_size=3)))
def test_cli_lifecycle(tmp_path_factory, monkeypatch, capfd, argv):
    """Commands on detached containers, fed ids that name none: nothing may start. The state
    and cache dirs are scratch ones; `run` gets a --rootfs that make_spec() refuses."""
    scratch = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MINICTR_STATE_DIR", str(scratch / "state"))
    monkeypatch.setenv("MINICTR_CACHE_DIR", str(scratch / "cache"))
    if argv[:1] == ["doctor"]:
        argv = [*argv, "--nonexistent"]  # a usage error: a real doctor run is not ours
    if argv[:1] == ["run"]:
        argv = ["run", "--rootfs", "/nonexistent", *argv[1:]]
    assert cli_answer(argv, capfd) in (0, 2, 125, 126, 127)
