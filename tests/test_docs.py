"""The documents hold: every Python block of every document runs as written (library
snippets are executed, test files, those defining `test_` functions, are run by pytest with
the plugin), the keyword table of docs/reference.md is the one the code declares, and the
links between documents lead somewhere."""

from __future__ import annotations

import glob
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCUMENTS = (README, REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md",
             REPO / "rootfs-builder" / "README.md", *sorted((REPO / "docs").glob("*.md")))
README_LINES = 300  # a newcomer's first page: the rest goes to docs/
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

LIMITS = re.compile(r"\b(memory|cpus|pids|memory_limit|cpu_limit|pids_limit)=")

# The servers the services examples start, and the clients they query them with (each found
# as ci/install-deps installs it from Debian's packages).
SERVERS = {"postgresql": ("postgresql", lambda: glob.glob("/usr/lib/postgresql/*/bin/postgres")
                          and shutil.which("psql")),
           "redis": ("redis-server and redis-tools",
                     lambda: shutil.which("redis-server") and shutil.which("redis-cli"))}


class Example:
    """One Python block: where it is (so that a traceback points into the document) and its
    code."""

    def __init__(self, document: Path, line: int, code: str):
        self.document, self.line, self.code = document, line, code
        self.is_test_file = "def test_" in code
        self.id = f"{document.relative_to(REPO)}:{line}"

    def compiled(self):
        return compile("\n" * (self.line - 1) + self.code, str(self.document), "exec")


def examples_of(document: Path) -> list[Example]:
    text = document.read_text()
    return [Example(document, text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in BLOCK.finditer(text)]


EXAMPLES = [example for document in DOCUMENTS for example in examples_of(document)]


def needing_what_they_use(examples: list[Example]) -> list:
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
    return [pytest.param(example, marks=marks(example.code), id=example.id)
            for example in examples]


@pytest.mark.parametrize("example", needing_what_they_use(
    [example for example in EXAMPLES if not example.is_test_file]))
def test_library_example_runs(example, cache_dir, monkeypatch):
    monkeypatch.setenv("MINICTR_CACHE_DIR", str(cache_dir))
    exec(example.compiled(), {"__name__": "document_example"})


@pytest.mark.parametrize("example", needing_what_they_use(
    [example for example in EXAMPLES if example.is_test_file]))
def test_plugin_example_passes(example, pytester, cache_dir):
    pytester.makepyfile(test_document_example=example.code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers",
                                           f"--minictr-cache-dir={cache_dir}")
    result.assert_outcomes(passed=example.code.count("def test_"))


def test_the_readme_shows_both_kinds_and_stays_a_first_page():
    shown = examples_of(README)
    assert sum(e.is_test_file for e in shown) >= 3 and sum(not e.is_test_file for e in shown) >= 2
    lines = len(README.read_text().splitlines())
    assert lines <= README_LINES, (f"README.md has {lines} lines, more than a newcomer's "
                                   f"{README_LINES}: move the reference part to docs/")


def test_the_keyword_table_is_the_declared_one():
    spec = importlib.util.spec_from_file_location("make_reference",
                                                  REPO / "docs" / "make_reference.py")
    make_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_reference)
    document = make_reference.REFERENCE.read_text()
    assert make_reference.with_table(document) == document, (
        f"docs/reference.md's keyword table is stale: run `{make_reference.COMMAND}`")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(REPO)))
def test_links_between_documents_lead_somewhere(document):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # another site's
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
            if anchor not in {_anchor(heading) for heading in headings}:
                broken.append(target)
    assert not broken, f"{document.relative_to(REPO)}: links to nowhere: {broken}"
