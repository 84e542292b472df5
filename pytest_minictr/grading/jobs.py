"""A grading job as values: `Job` (one submission), its `Case`s, `Limits` and `Checker`, read
from the JSON contract (DESIGN §3d) once, at the edge, by `Job.from_json`, and written back by
`to_json`.

A bad job is a ConfigError naming the job and the key (`job 's1': cases[1].stdin: expected a
string`); an unknown key is one too, so that a job written for a later schema is refused, not
half-read. `"schema": 1` may say which schema a job follows; it is the only one so far.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_minictr.errors import ConfigError
from pytest_minictr.sizes import parse_size

SCHEMA = 1
CHECKER_NAMES = ("exact", "tokens", "lines")
MiB = 1024 ** 2


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """{"path": "text"} as the sorted pairs the values hold (the library may pass a dict)."""
    return tuple(sorted(value.items())) if isinstance(value, Mapping) else tuple(value)


def _keep(instance: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(instance, name, value)  # (frozen: only __post_init__ does this)


@dataclass(frozen=True)
class Limits:
    """What one container of a job may use: a case's run, or (`Job.compile_limits`) its build.
    `cpu_time` and `timeout` are seconds; the sizes bytes."""

    memory: int = 256 * MiB
    cpu_time: float | None = None   # None: the wall timeout alone
    timeout: float = 10.0           # wall seconds, the backstop for sleeping programs
    pids: int = 64
    output: int = 1 * MiB           # bytes kept of each stream; more is `output_limit`
    disk: int = 16 * MiB            # bytes a case may write beside its working directory

    def to_json(self) -> dict[str, Any]:
        return {"memory": self.memory, "cpu_time": self.cpu_time, "timeout": self.timeout,
                "pids": self.pids, "output": self.output, "disk": self.disk}


COMPILE_LIMITS = Limits(memory=512 * MiB, timeout=30.0, pids=64, output=64 * 1024)


@dataclass(frozen=True)
class Checker:
    """How a case's output is judged: `kind` is exact, tokens, lines, float (`rel`, `abs`
    tolerances) or program (`program` run with input, output, answer; `files` beside it)."""

    kind: str = "exact"
    rel: float = 1e-6
    abs: float = 1e-9
    program: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _keep(self, program=tuple(self.program), files=_pairs(self.files))

    def to_json(self) -> Any:
        if self.kind == "float":
            return {"float": {"rel": self.rel, "abs": self.abs}}
        if self.kind == "program":
            return {"program": list(self.program), "files": dict(self.files)}
        return self.kind


@dataclass(frozen=True)
class Case:
    """One test of a job: its input and what is expected of it (None: only the exit status
    and the limits decide)."""

    id: str
    stdin: str = ""
    args: tuple[str, ...] = ()
    expected_stdout: str | None = None
    # files the program writes in its working directory, by relative path
    expected_files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _keep(self, args=tuple(self.args), expected_files=_pairs(self.expected_files))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "stdin": self.stdin, "args": list(self.args),
                "expected_stdout": self.expected_stdout,
                "expected_files": dict(self.expected_files)}


@dataclass(frozen=True)
class Job:
    """One submission: its files, how to build and run it, its cases and how they are judged.

    `compile`/`run` None take the language's (its recipe's `compile`/`run`); `compile=()`
    means no build step. The root filesystem is `rootfs` (a directory), else `image`, else the
    recipe `recipe`, else the recipe named `language`."""

    id: str
    cases: tuple[Case, ...]
    language: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    compile: tuple[str, ...] | None = None
    run: tuple[str, ...] | None = None
    checker: Checker = field(default_factory=Checker)
    limits: Limits = field(default_factory=Limits)
    compile_limits: Limits = COMPILE_LIMITS
    stop_on_failure: bool = False
    recipe: str | None = None
    rootfs: str | None = None
    image: str | None = None

    def __post_init__(self) -> None:
        _keep(self, cases=tuple(self.cases), files=_pairs(self.files),
              compile=None if self.compile is None else tuple(self.compile),
              run=None if self.run is None else tuple(self.run))

    @classmethod
    def from_json(cls, data: Any) -> Job:
        return job_from_json(data)

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "id": self.id, "language": self.language,
                "files": dict(self.files),
                "compile": None if self.compile is None else list(self.compile),
                "run": None if self.run is None else list(self.run),
                "cases": [case.to_json() for case in self.cases],
                "checker": self.checker.to_json(), "limits": self.limits.to_json(),
                "compile_limits": self.compile_limits.to_json(),
                "stop_on_failure": self.stop_on_failure, "recipe": self.recipe,
                "rootfs": self.rootfs, "image": self.image}


JOB_KEYS = ("schema", "id", "language", "files", "compile", "run", "cases", "checker",
            "limits", "compile_limits", "stop_on_failure", "recipe", "rootfs", "image")
CASE_KEYS = ("id", "stdin", "args", "expected_stdout", "expected_files")
LIMIT_KEYS = ("memory", "cpu_time", "timeout", "pids", "output", "disk")


class _Reader:
    """Reads one job's JSON, each error naming the job and the key as written."""

    def __init__(self, job_id: str):
        self.job_id = job_id

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"job {self.job_id!r}: {key}: {message}")

    def only_keys(self, data: Any, known: Sequence[str], where: str) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.fail(where, f"expected an object, got {data!r}")
        for key in data:
            if key not in known:
                raise self.fail(f"{where}.{key}" if where else str(key),
                                f"unknown key (known: {', '.join(known)})")
        return data

    def text(self, value: Any, key: str, optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {value!r}")
        return value

    def strings(self, value: Any, key: str, optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, str) or not isinstance(value, Sequence) or \
                not all(isinstance(item, str) for item in value):
            raise self.fail(key, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def files(self, value: Any, key: str) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected an object of path: text, got {value!r}")
        for path, text in value.items():
            if not is_relative_path(path):
                raise self.fail(f"{key}.{path}", "expected a relative path without '..'")
            self.text(text, f"{key}.{path}")
        return tuple(sorted((posixpath.normpath(path), text) for path, text in value.items()))

    def number(self, value: Any, key: str, optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            raise self.fail(key, f"expected a positive number, got {value!r}")
        return float(value)

    def size(self, value: Any, key: str) -> int:
        try:
            size = parse_size(value, key)
        except ConfigError as error:
            raise ConfigError(f"job {self.job_id!r}: {error}") from None
        if size <= 0:
            raise self.fail(key, f"expected a positive size, got {value!r}")
        return size

    def limits(self, value: Any, key: str, default: Limits) -> Limits:
        if value is None:
            return default
        data = self.only_keys(value, LIMIT_KEYS, key)
        given: dict[str, Any] = {}
        for name in ("memory", "output", "disk"):
            if name in data:
                given[name] = self.size(data[name], f"{key}.{name}")
        if "pids" in data:
            pids = data["pids"]
            if isinstance(pids, bool) or not isinstance(pids, int) or pids < 1:
                raise self.fail(f"{key}.pids", f"expected a positive integer, got {pids!r}")
            given["pids"] = pids
        if "timeout" in data:
            given["timeout"] = self.number(data["timeout"], f"{key}.timeout")
        if "cpu_time" in data:
            given["cpu_time"] = self.number(data["cpu_time"], f"{key}.cpu_time", optional=True)
        return Limits(**{**vars(default), **given})

    def checker(self, value: Any) -> Checker:
        if value is None or value in CHECKER_NAMES:
            return Checker(kind=value or "exact")
        if isinstance(value, Mapping) and set(value) == {"float"}:
            tolerances = self.only_keys(value["float"], ("rel", "abs"), "checker.float")
            rel, abs_ = (self.tolerance(tolerances.get(name, getattr(Checker, name)),
                                        f"checker.float.{name}") for name in ("rel", "abs"))
            return Checker(kind="float", rel=rel, abs=abs_)
        if isinstance(value, Mapping) and "program" in value:
            self.only_keys(value, ("program", "files"), "checker")
            program = self.strings(value["program"], "checker.program")
            if not program:
                raise self.fail("checker.program", "expected a command, got []")
            return Checker(kind="program", program=program,
                           files=self.files(value.get("files"), "checker.files"))
        raise self.fail("checker", f"expected one of {', '.join(CHECKER_NAMES)}, "
                        f"{{\"float\": {{\"rel\": R, \"abs\": A}}}} or {{\"program\": [...], "
                        f"\"files\": {{...}}}}, got {value!r}")

    def tolerance(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise self.fail(key, f"expected a number >= 0, got {value!r}")
        return float(value)

    def case(self, value: Any, index: int) -> Case:
        where = f"cases[{index}]"
        data = self.only_keys(value, CASE_KEYS, where)
        case_id = data.get("id", str(index + 1))
        if not isinstance(case_id, str) or not case_id:
            raise self.fail(f"{where}.id", f"expected a non-empty string, got {case_id!r}")
        return Case(id=case_id, stdin=self.text(data.get("stdin", ""), f"{where}.stdin"),
                    args=self.strings(data.get("args", ()), f"{where}.args"),
                    expected_stdout=self.text(data.get("expected_stdout"),
                                              f"{where}.expected_stdout", optional=True),
                    expected_files=self.files(data.get("expected_files"),
                                              f"{where}.expected_files"))


def job_from_json(data: Any) -> Job:
    """The Job a JSON object describes (DESIGN §3d); ConfigError naming the bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a job is a JSON object, got {data!r}")
    job_id = data.get("id")
    if not isinstance(job_id, str) or not job_id:
        raise ConfigError(f"job: id: expected a non-empty string, got {job_id!r}")
    read = _Reader(job_id)
    read.only_keys(data, JOB_KEYS, "")
    if data.get("schema", SCHEMA) != SCHEMA:
        raise read.fail("schema", f"{data['schema']!r} is not a schema this version reads "
                        f"(it reads {SCHEMA}): upgrade pytest-minictr")
    cases = data.get("cases")
    if isinstance(cases, str) or not isinstance(cases, Sequence) or not cases:
        raise read.fail("cases", f"expected a non-empty list of cases, got {cases!r}")
    read_cases = tuple(read.case(case, index) for index, case in enumerate(cases))
    ids = [case.id for case in read_cases]
    if len(set(ids)) != len(ids):
        raise read.fail("cases", f"case ids repeat: {ids}")
    stop = data.get("stop_on_failure", False)
    if not isinstance(stop, bool):
        raise read.fail("stop_on_failure", f"expected true or false, got {stop!r}")
    job = Job(id=job_id, cases=read_cases,
              language=read.text(data.get("language"), "language", optional=True),
              files=read.files(data.get("files"), "files"),
              compile=read.strings(data.get("compile"), "compile", optional=True),
              run=read.strings(data.get("run"), "run", optional=True),
              checker=read.checker(data.get("checker")),
              limits=read.limits(data.get("limits"), "limits", Limits()),
              compile_limits=read.limits(data.get("compile_limits"), "compile_limits",
                                         COMPILE_LIMITS),
              stop_on_failure=stop,
              recipe=read.text(data.get("recipe"), "recipe", optional=True),
              rootfs=read.text(data.get("rootfs"), "rootfs", optional=True),
              image=read.text(data.get("image"), "image", optional=True))
    if job.language is None and job.recipe is None and job.rootfs is None and job.image is None:
        raise read.fail("language", "missing: name a language (python3, c, cpp...), or give "
                        "recipe, rootfs or image")
    if job.run == ():
        raise read.fail("run", "expected a command, got []")
    return job


def is_relative_path(path: Any) -> bool:
    """A path that stays inside the directory it is taken from."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\0" in path:
        return False
    return ".." not in posixpath.normpath(path).split("/") and posixpath.normpath(path) != "."
