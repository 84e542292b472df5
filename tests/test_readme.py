"""The README's Python examples run as written: library snippets are executed, test files
(those defining `test_` functions) are run by pytest with the plugin."""

from __future__ import annotations

import glob
import re
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
LIBRARY = [code for code in EXAMPLES if "def test_" not in code]
TEST_FILES = [code for code in EXAMPLES if "def test_" in code]

LIMITS = re.compile(r"\b(memory|cpus|pids|memory_limit|cpu_limit|pids_limit)=")


# The servers the services examples start, and the clients they query them with (each found
# as ci/install-deps installs it from Debian's packages).
SERVERS = {"postgresql": ("postgresql", lambda: glob.glob("/usr/lib/postgresql/*/bin/postgres")
                          and shutil.which("psql")),
           "redis": ("redis-server and redis-tools",
                     lambda: shutil.which("redis-server") and shutil.which("redis-cli"))}


def needing_what_they_use(examples: list[str]) -> list:
    """Each example, marked to be skipped where the host denies what it uses: limits, host
    root (user=False), or a server and its client that are not installed."""
    def marks(code: str) -> list:
        marks = [mark for mark, used in ((pytest.mark.needs_limits, LIMITS.search(code)),
                                         (pytest.mark.needs_root, "user=False" in code)) if used]
        for recipe, (packages, installed) in SERVERS.items():
            if f'recipe="{recipe}"' in code and not installed():
                marks.append(pytest.mark.skip(reason=f"needs the Debian packages {packages}, "
                                                     "which this host lacks"))
        return marks
    return [pytest.param(code, marks=marks(code)) for code in examples]


@pytest.mark.parametrize("code", needing_what_they_use(LIBRARY),
                         ids=[f"library-{n}" for n in range(len(LIBRARY))])
def test_library_example_runs(code, cache_dir, monkeypatch):
    monkeypatch.setenv("MINICTR_CACHE_DIR", str(cache_dir))
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


@pytest.mark.parametrize("code", needing_what_they_use(TEST_FILES),
                         ids=[f"tests-{n}" for n in range(len(TEST_FILES))])
def test_plugin_example_passes(code, pytester, cache_dir):
    pytester.makepyfile(test_readme_example=code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers",
                                           f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(passed=code.count("def test_"))


def test_readme_has_examples_of_both_kinds():
    assert len(LIBRARY) >= 3 and len(TEST_FILES) >= 2
