"""Grading on a Ray cluster: each job one Ray task, on whichever node has room.

Ray does the scheduling, the retries and the bookkeeping of lost nodes; this module only says
what a job needs and turns every way a task can end into a `JobResult`. A job declares its
memory limit as the task's `memory` resource, so Ray places it on a node with that much left.
A task lost with its worker or its node is retried elsewhere (`retries` times, Ray's
`max_retries`); one that runs out of retries, or that failed on our side, is `infra_error`:
every job submitted comes back, none is lost silently.

Each Ray worker process keeps one warm `ContainerRuntime` (grading/warm.py) for all the tasks
Ray gives it, so a container starts in milliseconds there as it does locally. Ray is imported
only here, and only when a grader is asked to use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from pytest_minictr import ConfigError
from pytest_minictr.grading.jobs import Job
from pytest_minictr.grading.results import JobResult, infra_error
from pytest_minictr.grading.warm import process_runtime

INSTALL_HINT = "pip install 'pytest-minictr[ray]'"
# Ray's own default for a task's system failures (a dead worker or node).
DEFAULT_RETRIES = 3
# Tasks in flight at once, per CPU of the cluster: enough to keep every worker busy while
# results are collected, without holding a whole million-job batch in Ray's object store.
IN_FLIGHT_PER_CPU = 4


def import_ray() -> ModuleType:
    """Ray, or a ConfigError that says how to install it."""
    try:
        import ray  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(f"grading on Ray needs Ray: {INSTALL_HINT}") from None
    return ray


def grade_in_worker(job: Job, cache_dir: str | None, workdir: str | None) -> JobResult:
    """A Ray task's body, in a Ray worker process: the job, in this process's warm runtime."""
    from pytest_minictr import RootfsBuilder
    from pytest_minictr.grading.judge import grade_job
    remove_workspaces_of_the_dead(workdir)
    return grade_job(process_runtime(), job, RootfsBuilder(cache_dir=cache_dir), workdir)


def remove_workspaces_of_the_dead(workdir: str | None) -> None:
    """The workspaces Ray workers killed on this node left (a lost worker has no cleanup of
    its own, and nobody else on the node is told), removed before each job: a listing of one
    directory, of a few entries."""
    from pytest_minictr.grading.workspace import PREFIX, default_parent, remove_workspaces_of
    for path in Path(workdir or default_parent()).glob(f"{PREFIX}*-*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            remove_workspaces_of(int(pid), workdir)


class RayBackend:
    """Jobs graded as Ray tasks on the cluster at `address` (`"auto"`, `"HOST:PORT"`,
    `"ray://HOST:10001"`; None: the cluster this process is already connected to, else a new
    local one). `retries`: how often a job lost with its worker or node is tried again;
    `cache_dir` and `workdir` are paths on every node (see `Grader`)."""

    def __init__(self, address: str | None, retries: int = DEFAULT_RETRIES,
                 cache_dir: str | None = None, workdir: str | None = None):
        self.ray = import_ray()
        if not self.ray.is_initialized():
            self.ray.init(address=address, log_to_driver=False)
        self.retries = retries
        self._paths = (cache_dir, workdir)
        self._task = self.ray.remote(grade_in_worker)

    def imap_unordered(self, jobs: Iterable[Job]) -> Iterator[JobResult]:
        """Each job's result as it ends, in any order."""
        return (result for _, result in self.graded(jobs))

    def map(self, jobs: Iterable[Job]) -> list[JobResult]:
        """Each job's result, in the jobs' order."""
        return [result for _, result in sorted(self.graded(jobs), key=lambda x: x[0])]

    def graded(self, jobs: Iterable[Job]) -> Iterator[tuple[int, JobResult]]:
        """(the job's place in `jobs`, its result), as each job ends."""
        pending: dict[Any, tuple[int, Job]] = {}
        todo = enumerate(jobs)
        window = max(1, int(self._cluster("CPU")) * IN_FLIGHT_PER_CPU)
        largest = self._largest_node_memory()
        try:
            yield from self._drain(todo, pending, window, largest)
        finally:
            # the caller stopped early (Ctrl-C, a break): what still runs is not left behind
            for ref in pending:
                self.ray.cancel(ref, force=True)

    def _drain(self, todo: Iterator[tuple[int, Job]], pending: dict[Any, tuple[int, Job]],
               window: int, largest: int | None) -> Iterator[tuple[int, JobResult]]:
        while True:
            while len(pending) < window and (item := next(todo, None)) is not None:
                index, job = item
                if largest is not None and job.limits.memory > largest:
                    # Ray would keep an infeasible task pending for ever
                    yield index, infra_error(job.id, f"its memory limit ({job.limits.memory} "
                                                     f"bytes) exceeds every node's ({largest})")
                    continue
                pending[self._submit(job)] = (index, job)
            if not pending:
                return
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                index, job = pending.pop(ref)
                yield index, self._collect(ref, job)

    def _submit(self, job: Job) -> Any:
        options = self._task.options(memory=job.limits.memory, max_retries=self.retries,
                                     retry_exceptions=False, name=f"grade {job.id}")
        return options.remote(job, *self._paths)

    def _collect(self, ref: Any, job: Job) -> JobResult:
        try:
            result: JobResult = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            # a lost worker or node after its retries, or an exception of ours in the task:
            # never the program's, which grade_job turns into a verdict
            return infra_error(job.id, f"on Ray: {type(error).__name__}: "
                                       f"{str(error).splitlines()[0] if str(error) else ''}")
        return result

    def _cluster(self, resource: str) -> float:
        return float(self.ray.cluster_resources().get(resource, 1))

    def _largest_node_memory(self) -> int | None:
        sizes = [node["Resources"].get("memory") for node in self.ray.nodes() if node["Alive"]]
        known = [size for size in sizes if size is not None]
        return int(max(known)) if known else None
