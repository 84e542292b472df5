"""The pytest plugin: the `container` marker and fixture, sandboxed test bodies (see
`sandbox`), and the `--minictr-*` options.

    @pytest.mark.container(memory="64M", cpus=0.5, pids=32, timeout=5, binaries=["sh", "seq"])
    def test_bounded(container):
        assert container.run("seq 3").stdout == b"1\\n2\\n3\\n"

Settings come from four places; a later one wins: the ini file (`minictr_*` keys), the
environment (`MINICTR_*`), the command line (`--minictr-*`), and the closest `container`
marker (function over class over module; their keywords merge). Everything is validated once,
when the test sets up its fixture: a wrong keyword or value fails that test with a message
naming it. Each worker of pytest-xdist has its own runtime (and launcher); the rootfs cache is
shared safely between them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from pytest_minictr import __version__
from pytest_minictr.caller.runtime import ContainerRuntime
from pytest_minictr.doctor import checks as doctor
from pytest_minictr.errors import ConfigError, MinictrError, UnsupportedError
from pytest_minictr.keywords import ContainerSettings, marker_help
from pytest_minictr.plugin import outcome as body_outcome
from pytest_minictr.plugin import sandbox, secrets, wide, writable
from pytest_minictr.plugin.fixture import LAST_RESULT, TestContainer, unavailable
from pytest_minictr.plugin.host import (  # noqa: F401
    LAYER_PREFIX,
    check_host_can_run_containers,
    describe_result,
    layer_parent,
    remove_stale_layers,
    resolve_rootfs,
)
from pytest_minictr.plugin.services import ServiceFactory
from pytest_minictr.plugin.settings import (
    SessionSettings,
    add_options,
    keep_env_names,
    merge_marker,
    read_session_settings,
    sandbox_scope,
)
from pytest_minictr.rootfs.builder import RootfsBuilder

_SETTINGS = pytest.StashKey[SessionSettings]()
_ROOTFS_MEMO = pytest.StashKey[dict]()
# What runs now, for minictr_service: the fixtures being set up (innermost last), the test
_SETTING_UP = pytest.StashKey[list]()
_RUNNING_TEST = pytest.StashKey[list]()
_SERVICES = pytest.StashKey[ServiceFactory]()
_BODY_RUNTIME = pytest.StashKey[ContainerRuntime]()  # the sandboxed bodies' launcher
_BODY_SETTINGS = pytest.StashKey[ContainerSettings]()


# ---------------------------------------------------------------------------------------------
# Hooks

def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", marker_help())
    try:
        config.stash[_SETTINGS] = read_session_settings(config)
    except ConfigError as error:
        raise pytest.UsageError(f"pytest-minictr: {error}") from None
    config.pluginmanager.register(wide.SharedSandboxes(
        config.stash[_SETTINGS], functools.partial(_body_runtime, config),
        functools.partial(_published_services, config)), "minictr-shared-sandboxes")


def pytest_sessionstart(session: pytest.Session) -> None:
    """With every test sandboxed, the launcher starts while the tests are collected: a cold
    one costs the first body ~90 ms, a suite of a few seconds at session scope a few percent.
    Not in pytest-xdist's controller, which runs no test."""
    config = session.config
    if config.stash[_SETTINGS].sandbox_tests and not config.pluginmanager.hasplugin("dsession"):
        with contextlib.suppress(MinictrError):  # the first body says what is wrong
            _body_runtime(config).start()


def pytest_unconfigure(config: pytest.Config) -> None:
    runtime = config.stash.get(_BODY_RUNTIME, None)
    if runtime is not None:
        runtime.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash[_SETTINGS]
    bodies = ("all (--minictr-sandbox-tests) but those using the `container` fixture"
              if settings.sandbox_tests else
              "those marked `container` that do not use the `container` fixture")
    return [(f"minictr {__version__}: {doctor.header(doctor.examine(rehearse=False))}, "
             f"rootfs {settings.source}, cache {settings.cache_dir}"),
            f"minictr: test bodies run sandboxed: {bodies}",
            f"minictr: sandboxed: {sandbox.WHAT_RUNS}",
            f"minictr: sandbox scope: {wide.SCOPE_HEADER[settings.sandbox_scope]}",
            secrets.header(os.environ, keep_env_names(config)),
            *writable.header(settings.writable)]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A sandboxed body's settings are checked here: a wrong one is a setup error."""
    session = item.config.stash[_SETTINGS]
    if sandbox.wants_sandbox(item, session):
        try:
            sandbox_scope(item, session)
            item.stash[_BODY_SETTINGS] = sandbox.body_settings(item, session)
            problem = None
        except MinictrError as error:
            problem = error
        if problem is not None:
            pytest.fail(str(problem), pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A sandboxed body: whatever the item's kind (a function, a unittest method, a doctest,
    another plugin's item), the worker's `runtest` becomes the fork of its sandbox, which
    calls the real one; its verdict lands in the report (below). Every other plugin's
    wrapper of the call phase (capture, logging, xfail, ...) still runs around it here."""
    settings = item.stash.get(_BODY_SETTINGS, None)
    if settings is None or sandbox.in_body():
        return (yield)
    runtest = item.runtest
    item.runtest = functools.partial(_run_in_sandbox, item, runtest, settings)  # type: ignore[method-assign]
    try:
        return (yield)
    finally:
        del item.runtest


def _run_in_sandbox(item: pytest.Item, runtest: Callable[[], None],
                    settings: ContainerSettings) -> None:
    config = item.config
    try:
        outcome = sandbox.run_body(item, runtest, settings, _body_runtime(config),
                                   _published_services(config))
        problem = None
    except UnsupportedError as error:
        problem = error
    if problem is not None:
        unavailable(config.stash[_SETTINGS], problem)
    item.stash[body_outcome.OUTCOME] = outcome
    body_outcome.log_body_reports(item, outcome)
    if outcome.failure is not None:
        pytest.fail(outcome.failure, pytrace=False)


def _body_runtime(config: pytest.Config) -> ContainerRuntime:
    if _BODY_RUNTIME not in config.stash:
        config.stash[_BODY_RUNTIME] = ContainerRuntime()
    return config.stash[_BODY_RUNTIME]


def _published_services(config: pytest.Config) -> dict[tuple[str, int], str]:
    services = config.stash.get(_SERVICES, None)
    return services.published() if services is not None else {}


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A sandboxed body's call report gets the body's verdict, after every other plugin's
    wrapper made the worker's (which saw a test that returned). A failed test's report shows
    its last container: command, how it ended, stderr."""
    outcome = yield
    report = outcome.get_result()
    body = item.stash.get(body_outcome.OUTCOME, None)
    if call.when == "call" and body is not None and not sandbox.in_body():
        del item.stash[body_outcome.OUTCOME]
        body_outcome.apply_outcome(item, report, body)
    result = item.stash.get(LAST_RESULT, None)
    if report.failed and result is not None:
        report.sections.append(("minictr: last container", describe_result(result)))
    services = item.config.stash.get(_SERVICES, None)
    if report.failed and services is not None:
        report.sections.extend(services.report_sections(item))


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Iterator[None]:
    with _on_top(request.config, _SETTING_UP, fixturedef):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    with _on_top(item.config, _RUNNING_TEST, item):
        yield


@contextlib.contextmanager
def _on_top(config: pytest.Config, key: pytest.StashKey[list[Any]],
            value: Any) -> Iterator[None]:
    """`value` on top of the stack `key` while the hook's work goes on (see minictr_service)."""
    stack = config.stash.setdefault(key, [])
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


# ---------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="session")
def minictr_runtime() -> Iterator[ContainerRuntime]:
    """The session's ContainerRuntime (one launcher per pytest process or xdist worker)."""
    remove_stale_layers()
    with ContainerRuntime() as runtime:
        yield runtime


@pytest.fixture(scope="session")
def minictr_rootfs_builder(pytestconfig: pytest.Config) -> RootfsBuilder:
    """A RootfsBuilder on the session's cache dir: build custom root filesystems once."""
    return RootfsBuilder(cache_dir=pytestconfig.stash[_SETTINGS].cache_dir)


@pytest.fixture(scope="session")
def minictr_service(pytestconfig: pytest.Config, minictr_runtime: ContainerRuntime,
                    minictr_rootfs_builder: RootfsBuilder) -> Iterator[ServiceFactory]:
    """Start a server in a container: `minictr_service(recipe="redis", ports=[6379],
    wait_for_port=6379)` returns its Container (`.address(6379)`). Stopped at the end of
    the scope of the fixture that called it (or of the test that did)."""
    stash = pytestconfig.stash
    try:
        check_host_can_run_containers()
        problem = None
    except UnsupportedError as error:  # reported outside the handler: no chained traceback
        problem = error
    if problem is not None:
        unavailable(stash[_SETTINGS], problem)

    def now_running():
        setting_up = stash.get(_SETTING_UP, [])
        running = stash.get(_RUNNING_TEST, [])
        return (setting_up[-1] if setting_up else None), (running[-1] if running else None)
    factory = stash[_SERVICES] = ServiceFactory(minictr_runtime, minictr_rootfs_builder,
                                                now_running, stash[_SETTINGS])
    yield factory
    factory.stop_all()
    del stash[_SERVICES]


@pytest.fixture
def container(request: pytest.FixtureRequest, minictr_runtime: ContainerRuntime,
              minictr_rootfs_builder: RootfsBuilder) -> Iterator[TestContainer]:
    """A container for this test, configured by the closest `container` marker. Its writable
    layer is the test's own: successive `run()`s see each other's writes, other tests never."""
    session = request.config.stash[_SETTINGS]
    try:
        settings = merge_marker(session.defaults, request.node)
        if settings.writable:
            raise ConfigError(f"@pytest.mark.container: writable={list(settings.writable)!r} is "
                              "for a test body run sandboxed (without the `container` "
                              "fixture); a container writes to its own layer")
        check_host_can_run_containers()
        rootfs = resolve_rootfs(settings, minictr_rootfs_builder,
                                request.config.stash.setdefault(_ROOTFS_MEMO, {}))
        problem = None
    except MinictrError as error:  # reported outside the handler: no chained traceback
        problem = error
    if isinstance(problem, UnsupportedError):
        unavailable(session, problem)
    elif problem is not None:
        pytest.fail(str(problem), pytrace=False)
    box = TestContainer(minictr_runtime, rootfs, settings, request.node, session)
    yield box
    box.close()
