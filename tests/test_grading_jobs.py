"""Grading jobs (issue #28): every verdict for real, from C and Python programs under their
limits; the checkers; the build step and compile_error; stop_on_failure; expected_files; and
what a job the host cannot run gives (infra_error, never a program's verdict)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pytest_minictr import ContainerRuntime, RootfsBuilder
from pytest_minictr.errors import ConfigError
from pytest_minictr.grading import Job, grade_job
from pytest_minictr.grading.checkers import compare
from pytest_minictr.grading.jobs import Checker
from pytest_minictr.grading.judge import commands_of

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the limits of grading need cgroups "
                                "(root, or a delegated cgroup v2)")
FAST = {"timeout": 10, "memory": "64M"}
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (Debian's gcc)")


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    builder = RootfsBuilder(cache_dir=tmp_path_factory.mktemp("cache"))
    with ContainerRuntime() as runtime:
        def grade(data: dict):
            return grade_job(runtime, Job.from_json({"id": "job", **data}), builder)
        yield grade


def one_case(language: str, source: str, limits: dict | None = None, **case) -> dict:
    name = {"python3": "main.py", "c": "main.c"}[language]
    return {"language": language, "files": {name: source}, "cases": [case],
            "limits": {**FAST, **(limits or {})}}


C_PROGRAMS = {
    "ok": ("int main(void){ puts(\"42\"); return 0; }", {}),
    "wrong_answer": ("int main(void){ puts(\"41\"); return 0; }", {}),
    "runtime_error": ("int main(void){ puts(\"42\"); return 3; }", {}),
    "signal": ("int main(void){ volatile int *p = 0; return *p; }", {}),
    "timeout": ("#include <unistd.h>\nint main(void){ sleep(30); return 0; }", {"timeout": 1}),
    "cpu_time": ("int main(void){ for (;;) ; }", {"cpu_time": 1, "timeout": 10}),
    "memory": ("#include <stdlib.h>\n#include <string.h>\nint main(void){ for (;;) "
               "{ char *p = malloc(1 << 20); if (p) memset(p, 1, 1 << 20); } }", {}),
    "output_limit": ("int main(void){ for (;;) putchar('x'); }", {"output": "64K",
                                                                   "timeout": 10}),
}


@needs_gcc
@needs_root
@pytest.mark.parametrize("verdict", C_PROGRAMS)
def test_every_verdict_from_a_c_program(judge, verdict):
    source, limits = C_PROGRAMS[verdict]
    result = judge(one_case("c", "#include <stdio.h>\n" + source, limits,
                            expected_stdout="42\n"))
    assert result.compile is not None and result.compile.verdict == "ok"
    assert (result.verdict, result.cases[0].verdict) == (verdict, verdict), result
    case = result.cases[0]
    if verdict == "cpu_time":
        assert 1.0 <= case.cpu_time <= 1.3  # the cgroup's count (tests/test_cpu_time.py: 1.2)
    if verdict == "output_limit":
        assert case.wall_time < 5  # ended at the limit, not at its 10 s timeout
    if verdict == "signal":
        assert (case.returncode, case.to_json()["signal"]) == (-11, "SIGSEGV")


PYTHON_PROGRAMS = {
    "ok": "print(int(input()) * 2)",
    "wrong_answer": "print(int(input()) * 3)",
    "runtime_error": "raise SystemExit(2)",
    "signal": "import os, signal; os.kill(os.getpid(), signal.SIGABRT)",
    "timeout": "import time; time.sleep(30)",
    "memory": "x = [bytearray(1 << 20) for _ in range(1000)]",
}


@needs_root
@pytest.mark.parametrize("verdict", PYTHON_PROGRAMS)
def test_every_verdict_from_a_python_program(judge, verdict):
    limits = {"timeout": 2} if verdict == "timeout" else {}
    result = judge(one_case("python3", PYTHON_PROGRAMS[verdict], limits, stdin="21\n",
                            expected_stdout="42\n"))
    assert result.compile is None  # python3 has no build step
    assert result.verdict == verdict, result
    assert result.to_json()["cases"][0]["verdict"] == verdict


@needs_root
def test_a_result_carries_the_measures_and_the_heads_of_the_streams(judge):
    result = judge(one_case("python3", "import sys; print('x' * 5000); "
                            "sys.stderr.write('e' * 3000)", expected_stdout="x" * 5000 + "\n"))
    case = result.to_json()["cases"][0]
    assert case["verdict"] == "ok" and case["returncode"] == 0 and case["signal"] is None
    assert case["wall_time"] > 0 and case["cpu_time"] > 0 and case["memory_peak"] > 0
    assert (case["stdout"], case["stderr"]) == ("x" * 1024, "e" * 1024)


@needs_gcc
@needs_root
def test_compile_error_carries_the_compilers_output(judge):
    result = judge(one_case("c", "int main(void) { return undeclared; }", expected_stdout=""))
    assert result.verdict == "compile_error" and result.cases == ()
    assert "undeclared" in result.compile.stderr and result.compile.returncode == 1
    assert result.to_json()["compile"]["verdict"] == "runtime_error"


@needs_root
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (Debian's g++)")
def test_cpp_compiles_with_the_standard_library(judge):
    source = ("#include <iostream>\n#include <map>\nint main() { std::map<int, int> m{{1, 2}};"
              " int x; std::cin >> x; std::cout << m[1] * x << std::endl; }")
    result = judge({"language": "cpp", "files": {"main.cpp": source}, "limits": FAST,
                    "cases": [{"stdin": "21", "expected_stdout": "42\n"}]})
    assert result.verdict == "ok", result


@needs_root
@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (Debian's nodejs)")
def test_node_runs_where_the_host_has_it(judge):
    # V8 reserves much address space and starts threads: a limit of its own size
    result = judge({"language": "node", "files": {"main.js": "console.log(6 * 7)"},
                    "limits": {"memory": "256M", "timeout": 20},
                    "cases": [{"expected_stdout": "42\n"}]})
    assert result.verdict == "ok", result


@needs_root
@pytest.mark.skipif(shutil.which("javac") is None, reason="needs javac (default-jdk-headless)")
def test_java_compiles_and_runs_where_the_host_has_it(judge):
    source = ("import java.util.*; public class Main { public static void main(String[] a) "
              "{ System.out.println(new Scanner(System.in).nextInt() * 2); } }")
    result = judge({"language": "java", "files": {"Main.java": source},
                    "limits": {"timeout": 20}, "cases": [{"stdin": "21",
                                                          "expected_stdout": "42\n"}]})
    assert result.verdict == "ok", result


@needs_gcc
@needs_root
def test_the_build_runs_once_and_each_case_in_a_fresh_container(judge):
    # each case appends to a file in its working directory: a shared one would grow
    source = ("#include <stdio.h>\nint main(void){ FILE *f = fopen(\"log\", \"a\"); "
              "fputs(\"x\", f); fclose(f); f = fopen(\"log\", \"r\"); int n = 0; "
              "while (fgetc(f) != EOF) n++; printf(\"%d\\n\", n); return 0; }")
    result = judge({"language": "c", "files": {"main.c": source}, "limits": FAST,
                    "cases": [{"id": str(i), "expected_stdout": "1\n"} for i in range(3)]})
    assert [case.verdict for case in result.cases] == ["ok"] * 3, result


@needs_root
def test_stop_on_failure_skips_the_cases_after_the_first_failure(judge):
    job = one_case("python3", "print(int(input()) * 2)", stdin="1\n", expected_stdout="2\n")
    job["cases"] = [{"id": "a", "stdin": "1\n", "expected_stdout": "2\n"},
                    {"id": "b", "stdin": "2\n", "expected_stdout": "5\n"},
                    {"id": "c", "stdin": "3\n", "expected_stdout": "6\n"}]
    stopping = judge({**job, "stop_on_failure": True})
    assert [c.verdict for c in stopping.cases] == ["ok", "wrong_answer", "skipped"]
    assert stopping.verdict == "wrong_answer"
    going_on = judge(job)
    assert [c.verdict for c in going_on.cases] == ["ok", "wrong_answer", "ok"]


@needs_root
def test_expected_files_are_read_from_the_working_directory(judge):
    writer = ("import os\nos.makedirs('out', exist_ok=True)\n"
              "open('out/answer.txt', 'w').write(input())\n"
              "os.symlink('/etc/passwd', 'passwd')\n")
    right = judge(one_case("python3", writer, stdin="42",
                           expected_files={"out/answer.txt": "42"}))
    assert right.verdict == "ok", right
    wrong = judge(one_case("python3", writer, stdin="41",
                           expected_files={"out/answer.txt": "42"}))
    assert wrong.verdict == "wrong_answer" and "out/answer.txt" in wrong.cases[0].message
    # a symlink the program made is never followed on the host
    planted = judge(one_case("python3", writer, stdin="42", expected_files={
        "passwd": Path("/etc/passwd").read_text()}))
    assert planted.verdict == "wrong_answer"
    assert "not written (or not a regular file)" in planted.cases[0].message


@needs_root
def test_a_case_writing_without_end_is_stopped_by_its_memory_limit(judge):
    """Its working directory is a tmpfs whose pages its own cgroup pays for: the host's disk
    is never written, and the case ends `memory`."""
    flood = "block = b'x' * (1 << 20)\nwith open('big', 'wb') as f:\n    while True: " \
            "f.write(block)"
    result = judge(one_case("python3", flood, {"memory": "64M", "disk": "512M"}))
    assert result.verdict == "memory", result
    beside = judge(one_case("python3", flood.replace("'big'", "'/tmp/big'"), {"disk": "8M"}))
    stderr = beside.cases[0].stderr
    assert beside.verdict == "runtime_error", beside
    assert "No space left" in stderr or "File too large" in stderr, stderr


CHECKER = ("import os, sys\ninput_, output, answer = (open(p).read() for p in sys.argv[1:4])\n"
           "if 'fail' in input_: print('the test data is broken', file=sys.stderr); sys.exit(3)\n"
           "if 'crash' in input_: os.abort()\n"
           "sys.exit(0 if int(output) % int(answer) == 0 else 1)\n")


@needs_root
def test_a_checker_program_decides_and_a_crashing_one_is_infra_error(judge):
    def job(stdin: str) -> dict:
        return {**one_case("python3", "print(input())", stdin=stdin, expected_stdout="7"),
                "checker": {"program": ["python3", "check.py"], "files": {"check.py": CHECKER}}}
    assert judge(job("14")).verdict == "ok"
    rejected = judge(job("15"))
    assert rejected.verdict == "wrong_answer", rejected
    failed = judge(job("fail 7"))
    assert failed.verdict == "infra_error" and failed.cases[0].verdict == "infra_error"
    assert "the test data is broken" in failed.error and "exit status 3" in failed.error
    # with no answer given, the checker still judges: "any even number", its answer empty
    even = ("import sys\nassert open(sys.argv[3]).read() == ''\n"
            "sys.exit(int(open(sys.argv[2]).read()) % 2)")
    for stdin, verdict in (("14", "ok"), ("15", "wrong_answer")):
        unanswered = {**one_case("python3", "print(input())", stdin=stdin),
                      "checker": {"program": ["python3", "even.py"], "files": {"even.py": even}}}
        assert judge(unanswered).verdict == verdict
    crashed = judge(job("crash 7"))
    assert crashed.verdict == "infra_error" and "the checker failed (signal" in crashed.error


@needs_root
def test_a_job_the_host_cannot_run_is_infra_error(judge, tmp_path):
    missing = judge({**one_case("python3", "print(1)"), "rootfs": str(tmp_path / "none")})
    assert missing.verdict == "infra_error" and "none" in missing.error
    no_compiler = judge({**one_case("python3", "print(1)"), "compile": ["no-such-compiler"]})
    assert no_compiler.verdict == "infra_error" and "no-such-compiler" in no_compiler.error


@needs_root
def test_the_workspace_is_removed(judge):
    judge(one_case("python3", "open('x', 'w').write('y' * 1000)"))
    # (other runs on this host may have theirs: ours are named by our pid)
    assert [name for name in os.listdir("/dev/shm")
            if name.startswith(f"minictr-job-{os.getpid()}-")] == []


# --- the values, the recipes and the built-in checkers, without containers ---------------------

def test_a_recipe_takes_every_path_matching_and_a_jobs_commands(tmp_path):
    headers = tmp_path / "include"
    (headers / "sys").mkdir(parents=True)
    for name in ("a.h", "b.h", "sys/c.h", "notes.txt"):
        (headers / name).write_text(name)
    recipe = tmp_path / "lang.toml"
    recipe.write_text(f'''binaries = ["sh"]
matching = ["{headers}/*.h", "{headers}/sys"]
compile = ["cc", "main.c"]
run = ["./a.out"]
''')
    built = RootfsBuilder(cache_dir=tmp_path / "cache").build(recipe=str(recipe),
                                                              dest=tmp_path / "root")
    inside = built / str(headers).lstrip("/")
    assert sorted(p.name for p in inside.rglob("*")) == ["a.h", "b.h", "c.h", "sys"]
    job = Job.from_json({"id": "j", "recipe": str(recipe), "cases": [{}]})
    assert commands_of(job) == (("cc", "main.c"), ("./a.out",))



def test_a_job_round_trips_through_json():
    data = {"id": "s1", "language": "python3", "files": {"main.py": "print(1)"},
            "cases": [{"id": "c1", "stdin": "2\n", "expected_stdout": "4\n"},
                      {"id": "c2", "args": ["x"], "expected_files": {"a/b": "z"}}],
            "checker": {"float": {"rel": 1e-3, "abs": 0}},
            "limits": {"memory": "64M", "cpu_time": 1, "timeout": 5, "pids": 32,
                       "output": "1M"}, "stop_on_failure": True}
    job = Job.from_json(data)
    assert job.limits.memory == 64 * 1024 ** 2 and job.limits.cpu_time == 1.0
    assert Job.from_json(job.to_json()) == job


@pytest.mark.parametrize(("data", "named"), [
    ({"id": "s", "language": "c", "cases": [{"stdn": "1"}]}, "cases[0].stdn: unknown key"),
    ({"id": "s", "language": "c", "cases": []}, "cases: expected a non-empty list"),
    ({"id": "s", "cases": [{}]}, "language: missing"),
    ({"id": "s", "language": "c", "cases": [{}], "limits": {"memory": "1Q"}}, "limits.memory"),
    ({"id": "s", "language": "c", "cases": [{}], "schema": 2}, "schema: 2 is not a schema"),
    ({"id": "s", "language": "c", "cases": [{}], "files": {"../x": ""}}, "files.../x"),
    ({"id": "s", "language": "c", "cases": [{}], "checker": "fuzzy"}, "checker: expected"),
    ({"language": "c", "cases": [{}]}, "id: expected a non-empty string"),
])
def test_a_bad_job_names_its_key(data, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")
                       .replace(".", r"\.")):
        Job.from_json(data)


@pytest.mark.parametrize(("checker", "output", "answer", "accepted"), [
    (Checker("exact"), b"1 2\n", "1 2\n", True),
    (Checker("exact"), b"1 2", "1 2\n", False),
    (Checker("tokens"), b" 1\n\n2  ", "1 2\n", True),
    (Checker("tokens"), b"1 2 3", "1 2", False),
    (Checker("lines"), b"a  \nb\t\n\n\n", "a\nb\n", True),
    (Checker("lines"), b"a b\n", "ab\n", False),
    (Checker("float", rel=1e-6, abs=1e-9), b"3.1415927 2", "3.14159265 2.0", True),
    (Checker("float", rel=1e-6, abs=1e-9), b"3.15", "3.14159265", False),
    (Checker("float", rel=0, abs=0.01), b"0.005", "0", True),
    (Checker("float", rel=1e-6, abs=1e-9), b"nan x", "nan x", True),
])
def test_the_built_in_checkers(checker, output, answer, accepted):
    assert (compare(checker, output, answer) == "") is accepted
