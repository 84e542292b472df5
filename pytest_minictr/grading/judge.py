"""Grading one job on one `ContainerRuntime`: `grade_job(runtime, job) -> JobResult`.

The life of a job, top to bottom: its root filesystem (built once, cached), its files
written to a workspace (see `workspace`), the build (its compile command once, in a
container of its own, with the job's `compile_limits`, its output kept on `compile_error`),
then each case in a fresh container over the built files (read-only), its output judged by
the checker. Only the caller's public API is used: `ContainerRuntime.run`, `RootfsBuilder`.

A failure of ours or of the host (the rootfs cannot be built, a container cannot be set up,
the launcher died, a checker that cannot judge) makes the job `infra_error`, with what failed:
never one of the program's verdicts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pytest_minictr import ContainerRuntime, Mount, RootfsBuilder
from pytest_minictr.errors import ConfigError, MinictrError
from pytest_minictr.grading.checkers import compare, verdict_of_checker
from pytest_minictr.grading.jobs import Case, Job, Limits
from pytest_minictr.grading.results import (
    COMPILE_ERROR,
    INFRA_ERROR,
    OK,
    SKIPPED,
    WRONG_ANSWER,
    CaseResult,
    JobResult,
    infra_error,
    job_verdict,
)
from pytest_minictr.grading.workspace import BOX, BUILD, CHECK, CHECKER, Workspace, read_inside
from pytest_minictr.rootfs import recipe as recipes

CHECKER_LIMITS = Limits(memory=256 * 1024 ** 2, timeout=10.0, pids=16, output=64 * 1024)
COMPILE_OUTPUT_KEPT = 8192  # bytes of the compiler's output a compile_error carries


def grade_job(runtime: ContainerRuntime, job: Job, builder: RootfsBuilder | None = None,
              workdir: str | None = None) -> JobResult:
    """Grade `job` in containers of `runtime`; `builder` builds (and caches) its rootfs,
    `workdir` holds its workspace (default: /dev/shm, see `workspace`)."""
    try:
        rootfs = rootfs_of(job, builder)
        compile_command, run_command = commands_of(job)
        with Workspace(workdir) as workspace:
            return _Judge(runtime, job, rootfs, workspace).grade(compile_command, run_command)
    except (MinictrError, OSError) as error:
        return infra_error(job.id, error)


def rootfs_of(job: Job, builder: RootfsBuilder | None) -> str:
    if job.rootfs is not None:
        return job.rootfs
    if job.image is not None:
        return job.image
    return str((builder or RootfsBuilder()).build(recipe=job.recipe or job.language))


def commands_of(job: Job) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The job's compile and run commands, or its language's defaults (its recipe's
    `compile` and `run`)."""
    if job.compile is not None and job.run is not None:
        return job.compile, job.run
    name = job.recipe or job.language
    if name is None:
        raise ConfigError(f"job {job.id!r}: run: missing, and no language to take it from")
    defaults = recipe_commands(str(recipes.find(name)))
    run = job.run if job.run is not None else tuple(defaults.get("run", ()))
    if not run:
        raise ConfigError(f"job {job.id!r}: run: missing, and recipe {name!r} has no `run`")
    return (job.compile if job.compile is not None else tuple(defaults.get("compile", ())),
            run)


@functools.lru_cache(maxsize=64)
def recipe_commands(path: str) -> dict[str, Any]:
    """A recipe's TOML, read once a process (a batch reads it for every job otherwise)."""
    return recipes.parse_toml(Path(path).read_text())


def limit_keywords(limits: Limits) -> dict[str, Any]:
    """run()'s keywords for a job's limits."""
    return {"memory_limit": limits.memory, "pids_limit": limits.pids,
            "timeout": limits.timeout, "output_limit": limits.output,
            "layer_size": limits.disk, "network": "none", "cpu_time_limit": limits.cpu_time,
            # a flood is judged the moment it passes the limit, not at the wall timeout
            "kill_on_output_limit": True}


class _Judge:
    def __init__(self, runtime: ContainerRuntime, job: Job, rootfs: str,
                 workspace: Workspace):
        self.runtime = runtime
        self.job = job
        self.rootfs = rootfs
        self.workspace = workspace

    def grade(self, compile_command: tuple[str, ...],
              run_command: tuple[str, ...]) -> JobResult:
        self.workspace.write_files(self.job.files)
        built = self.build(compile_command) if compile_command else None
        if built is not None and built.verdict != OK:
            return JobResult(id=self.job.id, verdict=COMPILE_ERROR, compile=built)
        if self.job.checker.kind == "program":
            self.workspace.write_files(self.job.checker.files, self.workspace.checker)
        cases: list[CaseResult] = []
        for case in self.job.cases:
            if self.job.stop_on_failure and job_verdict(tuple(cases)) != OK:
                cases.append(CaseResult(id=case.id, verdict=SKIPPED))
                continue
            cases.append(self.run_case(case, run_command))
        verdict = job_verdict(tuple(cases))
        error = next((case.message for case in cases if case.verdict == INFRA_ERROR), "")
        return JobResult(id=self.job.id, verdict=verdict, cases=tuple(cases), compile=built,
                         error=error)

    def build(self, command: tuple[str, ...]) -> CaseResult:
        result = self.runtime.run(
            self.rootfs, command, cwd=BOX,
            mounts=[Mount.bind(self.workspace.build, BOX, read_only=False)],
            **limit_keywords(self.job.compile_limits)).wait()
        kept = CaseResult.of_run("compile", result.verdict,
                                 result)
        return CaseResult(**{**vars(kept),
                             "stdout": _text(result.stdout[:COMPILE_OUTPUT_KEPT]),
                             "stderr": _text(result.stderr[:COMPILE_OUTPUT_KEPT])})

    def run_case(self, case: Case, command: tuple[str, ...]) -> CaseResult:
        workdir = self.workspace.case_dir()
        result = self.runtime.run(
            self.rootfs, [*command, *case.args], input=case.stdin.encode(), cwd=BOX,
            mounts=[Mount.bind(self.workspace.build, BUILD),
                    Mount.bind(workdir, BOX, read_only=False)],
            **limit_keywords(self.job.limits)).wait()
        verdict = result.verdict
        if verdict != OK:
            return CaseResult.of_run(case.id, verdict, result)
        verdict, message = self.check(case, result.stdout, workdir)
        return CaseResult.of_run(case.id, verdict, result, message)

    def check(self, case: Case, stdout: bytes, workdir: Path) -> tuple[str, str]:
        outputs: list[tuple[str, bytes | None, str]] = []
        # a checker program judges every case: one with nothing expected gives it an empty
        # answer (a checker of "any valid output" needs none)
        judged_anyway = self.job.checker.kind == "program" and not case.expected_files
        if case.expected_stdout is not None or judged_anyway:
            outputs.append(("stdout", stdout, case.expected_stdout or ""))
        outputs.extend((path, read_inside(workdir, path, self.job.limits.output), expected)
                       for path, expected in case.expected_files)
        for name, output, expected in outputs:
            if output is None:
                return WRONG_ANSWER, f"{name}: not written (or not a regular file)"
            verdict, message = self.judge_output(case, output, expected)
            if verdict != OK:
                return verdict, f"{name}: {message}"
        return OK, ""

    def judge_output(self, case: Case, output: bytes, expected: str) -> tuple[str, str]:
        if self.job.checker.kind != "program":
            message = compare(self.job.checker, output, expected)
            return (WRONG_ANSWER, message) if message else (OK, "")
        inputs = self.workspace.checker_inputs(case.stdin.encode(), output, expected.encode())
        command = [*self.job.checker.program, f"{CHECK}/input", f"{CHECK}/output",
                   f"{CHECK}/answer"]
        try:
            result = self.runtime.run(
                self.rootfs, command, cwd=CHECKER,
                mounts=[Mount.bind(self.workspace.checker, CHECKER), Mount.bind(inputs, CHECK)],
                **limit_keywords(CHECKER_LIMITS)).wait()
        except MinictrError as error:  # its command cannot run: it could not judge
            return INFRA_ERROR, f"the checker failed: {error}"
        return verdict_of_checker(result)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
