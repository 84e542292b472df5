"""What grading a job gives: a `CaseResult` per case, the build's, and the `JobResult` that
holds them, as JSON lines (DESIGN §3d); the verdict names.

A job's verdict is `compile_error` (its build failed), `infra_error` (a failure of ours or of
the host: never the program's), else the first case verdict that is not `ok`, else `ok`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from pytest_minictr import Result

OK = "ok"
WRONG_ANSWER = "wrong_answer"
TIMEOUT = "timeout"
CPU_TIME = "cpu_time"
MEMORY = "memory"
SIGNAL = "signal"
RUNTIME_ERROR = "runtime_error"
OUTPUT_LIMIT = "output_limit"
SKIPPED = "skipped"
COMPILE_ERROR = "compile_error"
INFRA_ERROR = "infra_error"
CASE_VERDICTS = (OK, WRONG_ANSWER, TIMEOUT, CPU_TIME, MEMORY, SIGNAL, RUNTIME_ERROR,
                 OUTPUT_LIMIT, SKIPPED, INFRA_ERROR)
JOB_VERDICTS = (*CASE_VERDICTS[:-2], COMPILE_ERROR, INFRA_ERROR)
HEAD = 1024  # bytes of stdout and stderr a result carries
_SIGNALS = {int(number) for number in signal.Signals}


@dataclass(frozen=True)
class CaseResult:
    """One run (a case's, or the build's): its verdict and what the kernel measured. `message`
    says why a checker refused the output, or what failed on our side."""

    id: str
    verdict: str
    returncode: int | None = None
    wall_time: float | None = None
    cpu_time: float | None = None
    memory_peak: int | None = None
    stdout: str = ""
    stderr: str = ""
    message: str = ""

    @classmethod
    def of_run(cls, case_id: str, verdict: str, result: Result, message: str = "") -> CaseResult:
        return cls(id=case_id, verdict=verdict, returncode=result.returncode,
                   wall_time=round(result.wall_time, 6),
                   cpu_time=None if result.cpu_time is None else round(result.cpu_time, 6),
                   memory_peak=result.memory_peak, stdout=head(result.stdout),
                   stderr=head(result.stderr), message=message)

    @property
    def signal(self) -> str | None:
        if self.returncode is None or self.returncode >= 0:
            return None
        number = -self.returncode
        return signal.Signals(number).name if number in _SIGNALS else str(number)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "verdict": self.verdict, "returncode": self.returncode,
                "signal": self.signal, "wall_time": self.wall_time,
                "cpu_time": self.cpu_time, "memory_peak": self.memory_peak,
                "stdout": self.stdout, "stderr": self.stderr, "message": self.message}


@dataclass(frozen=True)
class JobResult:
    id: str
    verdict: str
    cases: tuple[CaseResult, ...] = ()
    compile: CaseResult | None = None
    error: str = ""   # what failed, for infra_error

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "verdict": self.verdict,
                "compile": None if self.compile is None else self.compile.to_json(),
                "cases": [case.to_json() for case in self.cases], "error": self.error}


def job_verdict(cases: tuple[CaseResult, ...]) -> str:
    return next((case.verdict for case in cases if case.verdict != OK), OK)


def infra_error(job_id: str, error: BaseException | str) -> JobResult:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return JobResult(id=job_id, verdict=INFRA_ERROR, error=text)


def head(data: bytes) -> str:
    return data[:HEAD].decode("utf-8", "replace")
