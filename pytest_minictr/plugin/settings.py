"""The plugin's settings: the `--minictr-*` options (ini < environment < command line) and the
`container` markers merged over them, each value checked once through the keyword schema."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from pytest_minictr.errors import ConfigError
from pytest_minictr.keywords import (
    MARKER_SCOPE,
    OPTION_KEYWORDS,
    ContainerSettings,
    Keyword,
    check_marker_names,
    check_marker_value,
    check_text,
)
from pytest_minictr.plugin import writable
from pytest_minictr.rootfs.builder import default_cache_dir

HELP_CACHE = "where built root filesystems are cached (default: $XDG_CACHE_HOME/minictr)"
HELP_UNAVAILABLE = ("where this host cannot run containers: 'fail' the tests that need one "
                    "(default) or 'skip' them, with the reason either way")
UNAVAILABLE_CHOICES = ("fail", "skip")
HELP_SANDBOX_TESTS = ("run every collected test's body sandboxed (the `container` marker's "
                      "defaults: --minictr-memory and the others), as a marker on each would; "
                      "tests that use the `container` fixture are not affected")
HELP_KEEP_ENV = ("keep this environment variable in sandboxed test bodies although its name "
                 "looks like a credential's (repeatable; ini and MINICTR_KEEP_ENV: names "
                 "separated by spaces)")
HELP_SANDBOX_SCOPE = ("how many tests share a sandbox: 'test' (default: one each; fixtures in "
                      "the worker), 'module' (a module's tests one after another) or "
                      "'session' (the worker's whole share); at module and session scope "
                      "the fixtures run in the sandbox too, and limits are the sandbox's")
SCOPES = ("test", "module", "session")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class SessionSettings:
    """The options of the run, before any marker."""

    defaults: ContainerSettings
    cache_dir: Path
    unavailable: str          # "fail" | "skip"
    source: str               # where the rootfs comes from, for the report header
    sandbox_tests: bool = False  # every test's body sandboxed, marked or not
    sandbox_scope: str = "test"  # how many tests share a sandbox (see `plugin.wide`)
    writable: tuple[str, ...] = ()  # every sandboxed body may write there (see `writable`)


def add_options(parser: pytest.Parser) -> None:
    """--minictr-NAME and the ini key minictr_NAME: one per option keyword, and the two
    options about the session rather than its containers."""
    group = parser.getgroup("minictr", "containers (pytest-minictr)")
    for keyword in OPTION_KEYWORDS:
        _add_option(parser, group, keyword.name, f"default of every container: {keyword.help}")
    _add_option(parser, group, "cache_dir", HELP_CACHE)
    _add_option(parser, group, "unavailable", HELP_UNAVAILABLE, choices=UNAVAILABLE_CHOICES)
    _add_option(parser, group, "sandbox_scope", HELP_SANDBOX_SCOPE, choices=SCOPES)
    # default None, not False: unset on the command line lets the environment and ini speak
    group.addoption("--minictr-sandbox-tests", dest="minictr_sandbox_tests",
                    action="store_true", default=None, help=HELP_SANDBOX_TESTS)
    parser.addini("minictr_sandbox_tests", HELP_SANDBOX_TESTS)
    group.addoption("--minictr-keep-env", dest="minictr_keep_env", action="append",
                    default=[], metavar="NAME", help=HELP_KEEP_ENV)
    parser.addini("minictr_keep_env", HELP_KEEP_ENV, type="args")
    writable.add_option(parser, group)


def keep_env_names(config: pytest.Config) -> tuple[str, ...]:
    """The names --minictr-keep-env, MINICTR_KEEP_ENV and the ini's minictr_keep_env keep
    (all count: each only adds names)."""
    return tuple(dict.fromkeys([*config.getini("minictr_keep_env"),
                                *os.environ.get("MINICTR_KEEP_ENV", "").split(),
                                *(config.getoption("minictr_keep_env") or [])]))


def _add_option(parser: pytest.Parser, group: pytest.OptionGroup, name: str, help_text: str,
                **options: Any) -> None:
    group.addoption("--minictr-" + name.replace("_", "-"), dest=f"minictr_{name}",
                    help=help_text, **(options or {"metavar": name.upper()}))
    parser.addini(f"minictr_{name}", help_text)


def read_session_settings(config: pytest.Config) -> SessionSettings:
    defaults = ContainerSettings(**{keyword.name: _option_value(config, keyword)
                                    for keyword in OPTION_KEYWORDS})
    unavailable = _option(config, "unavailable")[0] or "fail"
    if unavailable not in UNAVAILABLE_CHOICES:
        raise ConfigError(f"--minictr-unavailable={unavailable!r}: expected 'fail' or 'skip'")
    cache_dir = _option(config, "cache_dir")[0]
    source = f"image {defaults.image}" if defaults.image else f"from {defaults.rootfs}" \
        if defaults.rootfs else "built from host binaries"
    scope, spelled = _option(config, "sandbox_scope")
    if scope is not None and scope not in SCOPES:
        raise ConfigError(f"{spelled}={scope!r}: expected 'test', 'module' or 'session'")
    return SessionSettings(defaults, Path(cache_dir).expanduser() if cache_dir
                           else default_cache_dir(), unavailable, source,
                           _flag(*_option(config, "sandbox_tests")), scope or "test",
                           writable.session_writable(config))


def sandbox_scope(item: pytest.Item, session: SessionSettings) -> str:
    """The closest `container` marker's scope=, else the session's."""
    for marker in item.iter_markers("container"):
        scope = marker.kwargs.get(MARKER_SCOPE)
        if scope is not None:
            if scope not in SCOPES:
                raise ConfigError(f"@pytest.mark.container: scope={scope!r}: expected "
                                  "'test', 'module' or 'session'")
            return str(scope)
    return session.sandbox_scope


def _flag(text: str | None, spelled: str) -> bool:
    if text is None or text.lower() in _FALSE:
        return False
    if text.lower() in _TRUE:
        return True
    raise ConfigError(f"{spelled}={text!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def _option_value(config: pytest.Config, keyword: Keyword) -> Any:
    text, spelled = _option(config, keyword.name)
    return keyword.default if text is None else check_text(keyword, text, spelled)


def _option(config: pytest.Config, name: str) -> tuple[str | None, str]:
    """Command line, else environment, else ini: the first one set, and how an error names
    it there."""
    for value, spelled in ((config.getoption(f"minictr_{name}"),
                            "--minictr-" + name.replace("_", "-")),
                           (os.environ.get(f"MINICTR_{name.upper()}"),
                            f"environment variable MINICTR_{name.upper()}"),
                           (config.getini(f"minictr_{name}"), f"ini key minictr_{name}")):
        if value not in (None, ""):
            return str(value), spelled
    return None, ""


def merge_marker(defaults: ContainerSettings, item: pytest.Item) -> ContainerSettings:
    """Apply the `container` markers from the farthest (module) to the closest (function)."""
    keywords: dict[str, Any] = {}
    for marker in reversed(list(item.iter_markers("container"))):
        if marker.args:
            raise ConfigError(f"@pytest.mark.container{marker.args!r}: takes keywords only, "
                              f"e.g. container(memory='64M')")
        # scope= is the sandbox's, not a container's: read by `sandbox_scope`
        kwargs = {name: value for name, value in marker.kwargs.items() if name != MARKER_SCOPE}
        check_marker_names(kwargs)
        keywords.update(kwargs)
    sources = [name for name in ("image", "rootfs", "binaries", "recipe")
               if keywords.get(name) is not None]
    if len(sources) > 1 and sources != ["binaries", "recipe"]:
        raise ConfigError(f"@pytest.mark.container: give one of image=, rootfs= or "
                          f"binaries=/recipe=, not {'= and '.join(sources)}=")
    try:
        values = {name: check_marker_value(name, value) for name, value in keywords.items()}
    except ConfigError as error:  # named as the user wrote it: in the marker
        raise ConfigError(f"@pytest.mark.container: {error}") from None
    if sources:  # the marker's source beats a --minictr-rootfs or --minictr-image default
        values = {"rootfs": None, "image": None, **values}
    return replace(defaults, **values)
