"""Benchmark (prints figures; not a test): the README's first result, `etbench accuracy --model tiny-base --n 40`,
as a new user runs it right after `pip install`.

Runs the command twice as a child process (start-up, model load and evaluation all count): first with an empty
etbench cache (``ETBENCH_CACHE`` a new temporary directory), as on a fresh install, where the first load
dequantises the SmolLM2 GGUF; then again with that cache warm, as every later run. Prints each run's wall and
CPU time, the load average around it, and the machine unit (``etbench.core.machine_unit``: 100 products of two
1024 x 1024 float32 matrices, best of 3), timed in the same run before and after, so the figures can be read on
a machine of another speed as multiples of it.

    python tests/bench/bench_first_result.py
    python tests/bench/bench_first_result.py -- --n 100          # other options for the command
    python tests/bench/bench_first_result.py --warm-only         # skip the fresh-cache run

The file name does not match pytest's ``test_*.py`` pattern, so pytest never collects it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from etbench.core.machine_unit import machine_unit_seconds


def timed(argv: list[str], env: dict[str, str]) -> dict[str, float | str]:
    """Wall and CPU seconds (user + sys of the child) of one run, the load average before it, its output."""
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        sys.exit(f"bench_first_result: the command failed ({run.returncode}):\n{run.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load_before, "stdout": run.stdout, "stderr": run.stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-only", action="store_true", help="only the run with the cache as it is")
    parser.add_argument("extra", nargs="*", help="options for the command, after -- (default: --n 40)")
    args = parser.parse_args()
    command = [sys.executable, "-m", "etbench.cli", "accuracy", "--model", "tiny-base", "--no-progress",
               *(args.extra or ["--n", "40"])]
    unit_before = machine_unit_seconds()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_first_result_") as cache:
        if not args.warm_only:
            runs["fresh cache (first run after install)"] = timed(command, {**os.environ, "ETBENCH_CACHE": cache})
            runs["warm cache (every later run)"] = timed(command, {**os.environ, "ETBENCH_CACHE": cache})
        else:
            runs["cache as it is"] = timed(command, dict(os.environ))
    unit_after = machine_unit_seconds()
    unit = min(unit_before, unit_after)
    print("command:", " ".join(["etbench", *command[3:]]))
    print(f"machine unit: {unit:.2f} s (before {unit_before:.2f} s, after {unit_after:.2f} s; "
          f"{os.cpu_count()} CPUs, torch threads as the command uses them)")
    for name, r in runs.items():
        print(f"{name}: wall {r['wall']:.1f} s = {r['wall'] / unit:.1f} units, CPU {r['cpu']:.1f} s, "
              f"load average before {r['load']:.2f}")
    last = list(runs.values())[-1]
    print("its output:", last["stdout"].strip().replace("\n", " | "))
    print("its status lines:", last["stderr"].strip().replace("\n", " | "))


if __name__ == "__main__":
    main()
