"""Many jobs on one machine: `Grader(workers=N)` runs them in a pool of worker processes, each
with one warm `ContainerRuntime` (its launcher started once, so a case costs a container's
start, not a launcher's), and hands back each `JobResult` as it ends (`imap_unordered`) or
all of them in order (`map`).

Our own pool rather than multiprocessing.Pool: a worker that dies there takes its task with
it and the map waits forever. Here a dead worker's job is given to a fresh worker up to
`retries` times, then it is `infra_error`, never lost. Workers ignore SIGINT (Ctrl-C reaches
the whole process group: the caller decides) and end on SIGTERM through SystemExit, so their
runtimes kill their containers and their workspaces are removed: `close()` leaves nothing
running.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from pytest_minictr import ContainerRuntime, RootfsBuilder
from pytest_minictr.errors import ConfigError
from pytest_minictr.grading.jobs import Job
from pytest_minictr.grading.judge import grade_job
from pytest_minictr.grading.results import JobResult, infra_error
from pytest_minictr.grading.workspace import remove_workspaces_of

STOP_GRACE = 5.0  # seconds a worker has to clean up after SIGTERM, then SIGKILL


@dataclass(frozen=True)
class _Settings:
    cache_dir: str | None
    workdir: str | None


def _worker_main(connection: Connection, settings: _Settings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_now)
    builder = RootfsBuilder(cache_dir=settings.cache_dir) if settings.cache_dir \
        else RootfsBuilder()
    with ContainerRuntime() as runtime:
        while True:
            try:
                task = connection.recv()
            except EOFError:  # the grader is gone
                return
            if task is None:
                return
            index, job = task
            connection.send((index, grade_job(runtime, job, builder, settings.workdir)))


def _exit_now(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class _Worker:
    def __init__(self, context: Any, settings: _Settings):
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(theirs, settings),
                                       daemon=True, name="minictr-grader")
        self.process.start()
        theirs.close()
        self.task: tuple[int, Job] | None = None
        self.tries = 0

    def give(self, task: tuple[int, Job], tries: int) -> None:
        self.task, self.tries = task, tries
        self.connection.send(task)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(STOP_GRACE)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


class Grader:
    """A pool of `workers` processes grading jobs (default: one per core). `cache_dir`: the
    rootfs cache; `workdir`: where jobs' workspaces go; `retries`: how often a job whose
    worker died is tried again before it is `infra_error`. `ray`: the address of a Ray cluster
    whose nodes grade the jobs instead of local workers (grading/ray_backend.py)."""

    def __init__(self, workers: int | None = None, *, cache_dir: str | None = None,
                 workdir: str | None = None, retries: int = 1,
                 start_method: str = "forkserver", ray: str | None = None):
        workers = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers={workers!r}: expected a positive integer")
        self.workers = workers
        self.retries = retries
        self._settings = _Settings(cache_dir, workdir)
        self._context = multiprocessing.get_context(start_method)
        self._pool: list[_Worker] = []
        self._ray = None
        if ray is not None:
            from pytest_minictr.grading.ray_backend import RayBackend  # Ray: only if asked
            self._ray = RayBackend(ray, retries, cache_dir, workdir)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def map(self, jobs: Iterable[Job]) -> list[JobResult]:
        """Every job's result, in the order of `jobs`."""
        results: dict[int, JobResult] = dict(self._results(jobs))
        return [results[index] for index in sorted(results)]

    def imap_unordered(self, jobs: Iterable[Job]) -> Iterator[JobResult]:
        """Each job's result as it ends; `jobs` is read as workers come free."""
        for _, result in self._results(jobs):
            yield result

    def close(self) -> None:
        """Stop every worker (each kills its containers and removes its workspace)."""
        pool, self._pool = self._pool, []
        for worker in pool:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in pool:
            worker.stop()

    def _results(self, jobs: Iterable[Job]) -> Iterator[tuple[int, JobResult]]:
        if self._ray is not None:
            yield from self._ray.graded(jobs)
            return
        finished = False
        try:
            yield from self._run_all(jobs)
            finished = True
        finally:
            if not finished:  # left early (an error, Ctrl-C, a break): no job runs on unseen
                self.close()

    def _run_all(self, jobs: Iterable[Job]) -> Iterator[tuple[int, JobResult]]:
        pending = enumerate(jobs)
        retry: list[tuple[tuple[int, Job], int]] = []
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self._context, self._settings))
        busy = 0
        exhausted = False
        while True:
            for worker in list(self._pool):
                if worker.task is None and (retry or not exhausted):
                    given = self._give_next(worker, pending, retry)
                    exhausted = exhausted or not given
                    busy += given
            if busy == 0:
                return
            for ended in self._wait_busy():
                busy -= 1
                yield from self._collect(ended, retry)

    def _give_next(self, worker: _Worker, pending: Iterator[tuple[int, Job]],
                   retry: list[tuple[tuple[int, Job], int]]) -> bool:
        """Give an idle worker a job to retry, or the next one; False when none is left."""
        if retry:
            task, tries = retry.pop()
        else:
            next_task = next(pending, None)
            if next_task is None:
                return False
            task, tries = next_task, 0
        if not worker.process.is_alive():  # it sent its last result, then died
            worker = self._replace(worker)
        worker.give(task, tries)
        return True

    def _wait_busy(self) -> list[_Worker]:
        busy = [worker for worker in self._pool if worker.task is not None]
        ready = set(wait([*(w.connection for w in busy), *(w.process.sentinel for w in busy)]))
        return [w for w in busy if w.connection in ready or w.process.sentinel in ready]

    def _collect(self, worker: _Worker,
                 retry: list[tuple[tuple[int, Job], int]]) -> Iterator[tuple[int, JobResult]]:
        task, worker.task = worker.task, None
        assert task is not None
        try:
            index, result = worker.connection.recv()
        except (EOFError, OSError):  # it died with the job
            self._replace(worker)
            if worker.tries < self.retries:
                retry.append((task, worker.tries + 1))
                return
            yield task[0], infra_error(task[1].id, f"the worker grading it died (exit status "
                                       f"{worker.process.exitcode}), {worker.tries + 1} times")
            return
        yield index, result

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        remove_workspaces_of(worker.process.pid, self._settings.workdir)
        fresh = _Worker(self._context, self._settings)
        self._pool[self._pool.index(worker)] = fresh
        return fresh
