"""What a rootfs cache hit costs: `RootfsBuilder().build(...)` of a rootfs already built, for
a set of host binaries and for each recipe this host can build, in one process (as the plugin
and a library user call it), and in a fresh process (as one `minictr run` does).

Peer, measured in the same run: `shutil.which()` of the same binaries, the least any lookup
by name must do. Targets: a hit in a warm process <= 1 ms for every recipe (README).

    python tests/benchmarks/bench_rootfs_cache.py [--rounds 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from pytest_minictr.rootfs import recipe as recipes
from pytest_minictr.rootfs.builder import RootfsBuilder
from pytest_minictr.rootfs.defaults import BASE_BINARIES

TARGET_MS = 1.0


def best_of(rounds: int, call) -> float:
    """The fastest of `rounds` calls, in ms: what a hit costs when nothing else competes (the
    median is printed too, for a loaded machine)."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return times[0], times[len(times) // 2]


def cold_process_ms(arguments: str) -> float:
    """One hit in a new interpreter (the module imports are left out of the figure)."""
    code = ("import time; from pytest_minictr.rootfs.builder import RootfsBuilder as B; "
            f"t = time.perf_counter(); B().build({arguments}); "
            "print((time.perf_counter() - t) * 1000)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    return float(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    builder = RootfsBuilder()
    binaries = [name for name in BASE_BINARIES if shutil.which(name)]
    cases = {"binaries": (dict(binaries=binaries), f"binaries={binaries!r}")}
    for name in recipes.available():
        try:
            builder.build(recipe=name)
        except Exception as error:  # noqa: BLE001 (a recipe this host cannot build)
            print(f"{name}: skipped ({error})", file=sys.stderr)
            continue
        cases[f"recipe {name}"] = (dict(recipe=name), f"recipe={name!r}")
    builder.build(binaries=binaries)
    peer_best, peer_median = best_of(options.rounds,
                                     lambda: [shutil.which(name) for name in binaries])
    figures = {"peer which() of the binaries": {"best_ms": peer_best, "median_ms": peer_median}}
    for label, (keywords, text) in cases.items():
        best, median = best_of(options.rounds, lambda keywords=keywords: builder.build(**keywords))
        figures[label] = {"best_ms": best, "median_ms": median, "cold_process_ms":
                          cold_process_ms(text), "ratio_to_peer": median / peer_median,
                          "within_target": median <= TARGET_MS}
    if options.json:
        print(json.dumps(figures))
    else:
        print(f"{'lookup':<30}{'best ms':>9}{'median ms':>11}{'cold ms':>9}{'x peer':>8}")
        for label, values in figures.items():
            print(f"{label:<30}{values['best_ms']:>9.3f}{values['median_ms']:>11.3f}"
                  f"{values.get('cold_process_ms', float('nan')):>9.3f}"
                  f"{values.get('ratio_to_peer', 1.0):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
