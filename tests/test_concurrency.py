"""Many callers at once: threads of one runtime, stop() racing a natural end, wait() from two
threads, and ids that are never given twice. (The README promises that one runtime may be
shared by threads: these are what holds it to that.)"""

from __future__ import annotations

import random
import threading
import time

import pytest

pytestmark = pytest.mark.usefixtures("no_leftovers")


def test_stop_racing_the_natural_end_always_gives_one_consistent_result(runtime, rootfs):
    rng = random.Random(7)
    for _ in range(25):
        container = runtime.run(rootfs, ["sleep", "0.02"])
        time.sleep(rng.uniform(0, 0.04))
        result = container.stop(grace=0)
        assert result.returncode in (0, -9)
        assert container.status == ("exited" if result.returncode == 0 else "stopped")
        assert container.wait() is result


def test_wait_from_two_threads_gets_the_same_result(runtime, rootfs):
    container = runtime.run(rootfs, ["sh", "-c", "sleep 0.2; echo done"])
    results = []
    threads = [threading.Thread(target=lambda: results.append(container.wait()))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] is results[1] and results[0].stdout == b"done\n"


def test_threads_stopping_and_waiting_on_each_others_containers(runtime, rootfs):
    containers = [runtime.run(rootfs, ["sleep", "30"]) for _ in range(6)]
    errors = []

    def stop(container):
        try:
            assert container.stop(grace=0).returncode == -9
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=stop, args=(c,)) for c in containers * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and runtime.list() == []


def test_eight_threads_run_containers_on_one_runtime_at_once(runtime, rootfs):
    """Each thread starts containers, feeds each its own input, looks at one while it runs
    (stats, exec, status, list) and gets its own output back: nothing crosses between
    threads, nothing is lost, and every container ends."""
    start = threading.Barrier(8)
    errors: list[BaseException] = []
    ids: list[str] = []

    def work(thread: int) -> None:
        try:
            start.wait()
            for round_ in range(4):
                data = f"thread {thread} round {round_}\n".encode() * 1000
                result = runtime.run(rootfs, ["cat"], input=data, timeout=30).wait()
                assert (result.returncode, result.stdout) == (0, data)
                ids.append(result.container_id)
            sleeper = runtime.run(rootfs, ["sleep", "30"])
            assert sleeper.stats().processes == 1
            assert sleeper.exec(["echo", str(thread)]).stdout == f"{thread}\n".encode()
            assert runtime.status(sleeper.id) == "running" and sleeper in runtime.list()
            assert sleeper.stop(grace=0).returncode == -9
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(ids)) == 32 and runtime.list() == []


def test_ids_are_never_given_twice(runtime, rootfs, monkeypatch):
    ids = {runtime.run(rootfs, ["true"]).wait().container_id for _ in range(200)}
    assert len(ids) == 200
    # even when chance repeats one: the next draw is taken
    draws = iter([next(iter(ids)), "0123456789ab"])
    monkeypatch.setattr("pytest_minictr.caller.runtime.secrets.token_hex", lambda _: next(draws))
    assert runtime._new_id() == "0123456789ab"
