"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{n}" for n in range(len(EXAMPLES))])
def test_readme_example_runs(code, cache_dir, monkeypatch):
    monkeypatch.setenv("MINICTR_CACHE_DIR", str(cache_dir))
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_has_examples():
    assert len(EXAMPLES) >= 3
