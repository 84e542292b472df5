"""Checkers: whether a case's output is the answer. The built-in ones compare bytes here, in
the caller (`exact`, `tokens`, `lines`, `float`); a `program` checker is the job's own and runs
in a sandbox of its own (the judge runs it, `verdict_of_checker` reads its end).

Each returns "" when the output is accepted, else a short message naming the first
difference, which the case result carries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pytest_minictr import Result
from pytest_minictr.grading.jobs import Checker
from pytest_minictr.grading.results import INFRA_ERROR, OK, WRONG_ANSWER

# testlib's exit statuses: 0 accepted, 1 wrong answer, 2 presentation error (a wrong answer
# too, to us), 3 "fail": the checker itself found the test data broken
TESTLIB_REJECTS = (1, 2)
SHOWN = 40  # bytes of a differing token or line a message shows


def compare(checker: Checker, output: bytes, expected: str) -> str:
    """"" if `output` is the `expected` answer for this built-in checker, else why not."""
    answer = expected.encode()
    if checker.kind == "tokens":
        return compare_tokens(output.split(), answer.split(), _same_token)
    if checker.kind == "float":
        return compare_tokens(output.split(), answer.split(),
                              lambda got, want: _close(got, want, checker.rel, checker.abs))
    if checker.kind == "lines":
        return compare_lines(output, answer)
    return compare_exact(output, answer)


def compare_exact(output: bytes, answer: bytes) -> str:
    if output == answer:
        return ""
    at = next((i for i, (a, b) in enumerate(zip(output, answer, strict=False)) if a != b),
              min(len(output), len(answer)))
    return (f"differs at byte {at}: expected {answer[at:at + SHOWN]!r}, "
            f"got {output[at:at + SHOWN]!r}")


def compare_tokens(got: list[bytes], want: list[bytes],
                   same: Callable[[bytes, bytes], bool]) -> str:
    for index, (mine, theirs) in enumerate(zip(got, want, strict=False), start=1):
        if not same(mine, theirs):
            return f"token {index}: expected {theirs[:SHOWN]!r}, got {mine[:SHOWN]!r}"
    if len(got) != len(want):
        return f"expected {len(want)} tokens, got {len(got)}"
    return ""


def compare_lines(output: bytes, answer: bytes) -> str:
    got, want = _lines(output), _lines(answer)
    for index, (mine, theirs) in enumerate(zip(got, want, strict=False), start=1):
        if mine != theirs:
            return f"line {index}: expected {theirs[:SHOWN]!r}, got {mine[:SHOWN]!r}"
    if len(got) != len(want):
        return f"expected {len(want)} lines, got {len(got)}"
    return ""


def _lines(data: bytes) -> list[bytes]:
    """The lines without their trailing whitespace, and without blank lines at the end."""
    lines = [line.rstrip() for line in data.split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _same_token(got: bytes, want: bytes) -> bool:
    return got == want


def _close(got: bytes, want: bytes, rel: float, abs_: float) -> bool:
    if got == want:
        return True
    try:
        mine, theirs = float(got), float(want)
    except ValueError:
        return False
    if math.isnan(mine) or math.isnan(theirs):
        return math.isnan(mine) and math.isnan(theirs)
    return math.isclose(mine, theirs, rel_tol=rel, abs_tol=abs_)


def verdict_of_checker(result: Result) -> tuple[str, str]:
    """A checker program's end as (verdict, message): exit 0 accepts, 1 or 2 reject (testlib's
    wrong answer and presentation error); anything else (testlib's 3, a crash, a signal, a
    limit) means the checker could not judge, which is no verdict on the program: infra_error,
    with the checker's own words."""
    said = (result.stderr or result.stdout)[-300:].decode("utf-8", "replace").strip()
    if result.verdict == "ok":
        return OK, said
    if result.verdict == "runtime_error" and result.returncode in TESTLIB_REJECTS:
        return WRONG_ANSWER, said
    return INFRA_ERROR, (f"the checker failed ({result.verdict}, exit status "
                         f"{result.returncode}): {said}")
