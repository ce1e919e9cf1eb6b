"""Benchmark (not a test): `etbench circuit discover --model tiny-base --fast` as a first-time user runs it.

Issue #12's acceptance point: with its default settings the command finishes in <= 2 min on 2 idle
cores (defaults: --fast, --n 16, no pruning). This script runs the command itself (a child process, so start-up and model load count) and
prints wall time, CPU time (user + sys of the child: less sensitive to other load than wall time),
the load average around the run, and the command's own per-phase wall times and forward passes.

    python tests/bench/bench_discover.py                        # the defaults
    python tests/bench/bench_discover.py -- --n 32 --minimality none
    python tests/bench/bench_discover.py --profile -- --n 8      # where the time goes (cProfile, top 25)

Arguments after ``--`` are passed to the command. The file name does not match pytest's ``test_*.py``
pattern, so pytest never collects it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PROFILE_RUNNER = """
import cProfile, pstats, sys
from etbench.cli import main
argv, out = sys.argv[1:-1], sys.argv[-1]
sys.argv = ["etbench", *argv]
prof = cProfile.Profile()
try:
    prof.runcall(main)
except SystemExit as stop:
    if stop.code:
        raise
prof.dump_stats(out)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-base")
    parser.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("extra", nargs="*", help="options passed to the command (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "circuit.json")
        cmd = ["circuit", "discover", "--model", args.model, "--fast", "--out", out, "--no-progress", *args.extra]
        prof = os.path.join(tmp, "discover.prof")
        argv = ([sys.executable, "-c", PROFILE_RUNNER, *cmd, prof] if args.profile
                else [sys.executable, "-m", "etbench.cli", *cmd])
        load_before = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        run = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
        if run.returncode != 0:
            sys.exit(f"the command failed ({run.returncode}):\n{run.stderr[-3000:]}")
        print(run.stdout)
        user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
        circuit = json.load(open(out))
        stats = circuit.get("stats", {})
        print("command: etbench " + " ".join(["circuit", "discover", "--model", args.model, "--fast", *args.extra]))
        print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, "
              f"nice {os.nice(0)}, {os.cpu_count()} CPUs")
        print(f"wall {wall:.1f} s; CPU {user + system:.1f} s (user {user:.1f} + sys {system:.1f}); "
              f"peak RSS {after.ru_maxrss / 1024:.0f} MB")
        print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
        print(f"phases (wall s): {json.dumps({k: round(v, 1) for k, v in stats.get('wall_s', {}).items()})}")
        passes = stats.get("forward_passes", {})
        print("forward passes: " + ", ".join(f"{k} {v['calls']}" for k, v in passes.items() if isinstance(v, dict)))
        if args.profile:
            import pstats

            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
