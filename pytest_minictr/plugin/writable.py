"""Host paths every sandboxed test body may write, session-wide: `--minictr-writable PATH`
(repeatable), MINICTR_WRITABLE (paths separated by ':') and the ini's `minictr_writable` (a
list), all counted; relative paths are taken against the rootdir. They add to each marker's
`writable=` and to the test's tmp_path. What they are for: the files a suite's tools keep
across tests, such as Hypothesis's `.hypothesis` example database.

A path that does not exist is made, as a directory with its parents, when the session starts:
the body cannot make it (its view of the host is read-only, and a writable bind needs a mount
point that exists), and the tools that want one make theirs lazily, so a fresh checkout has
none; refusing would make every CI job create it by hand first. The report header names the
paths, so a misspelt one shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_minictr.errors import ConfigError
from pytest_minictr.validate import check_writable

OPTION = "--minictr-writable"
HELP = ("a host path every sandboxed test body may write, besides its tmp_path and the "
        "marker's writable= (repeatable; ini minictr_writable, MINICTR_WRITABLE: paths "
        "separated by ':'; relative to the rootdir; made as a directory if missing)")


def add_option(parser: pytest.Parser, group: pytest.OptionGroup) -> None:
    group.addoption(OPTION, dest="minictr_writable", action="append", default=[],
                    metavar="PATH", help=HELP)
    parser.addini("minictr_writable", HELP, type="args")


def session_writable(config: pytest.Config) -> tuple[str, ...]:
    """The session's writable paths, absolute and real, each made if it was missing."""
    given = [*config.getini("minictr_writable"),
             *os.environ.get("MINICTR_WRITABLE", "").split(os.pathsep),
             *(config.getoption("minictr_writable") or [])]
    paths = [config.rootpath / os.path.expanduser(path) for path in given if path]
    for path in paths:
        _make_directory(path)
    return check_writable([str(path) for path in dict.fromkeys(paths)], OPTION)


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file (or a link to one): writable as it is
    except OSError as error:
        raise ConfigError(f"{OPTION}={str(path)!r}: missing, and it cannot be made "
                          f"({error.strerror})") from None


def header(paths: tuple[str, ...]) -> list[str]:
    return [f"minictr: sandboxed bodies may also write: {', '.join(paths)}"] if paths else []
