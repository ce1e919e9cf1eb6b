"""Benchmark (prints figures; not a test): an estimate of one pair's wall time under ``etbench score-many``.

Replays the order in which each side of a pair reads the stage cache under its plan (found by running
``pipeline.score`` against a placeholder cache: tests/support/stage_reads.py) with given per-stage
seconds: a stage the side computes takes its time, a stage it waits for is ready when the other side
stored it. Prints each side's timeline and idle time, the pair's wall time on 2 workers, and the sum
of the stage times (one ``etbench score`` process). It is an estimate: it assumes a stage takes as long
beside the other side as it did when it was timed, and it leaves out model loading and polling.

    python tests/bench/bench_side_schedule.py STAGE_SECONDS.json [--preset standard]

STAGE_SECONDS.json: ``{"stage name": seconds}`` for every stage, or a run's ``timings.json`` (its
``computed_s``) when that run computed every stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

# why: run as a script, tests/ is not on the path that pytest's ``pythonpath`` setting gives the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etbench.scoring.distributed import SIDES, side_plan  # noqa: E402
from etbench.scoring.stages import COMPUTE  # noqa: E402
from support.stage_reads import stage_reads  # noqa: E402


def replay(reads: dict[str, list[tuple[str, str]]], seconds: dict[str, float]):
    """(each side's end time, idle time, timeline [(event, time)])."""
    clock = {s: 0.0 for s in reads}
    idle = {s: 0.0 for s in reads}
    at = {s: 0 for s in reads}
    stored: dict[str, float] = {}
    timeline: dict[str, list[tuple[str, float]]] = {s: [] for s in reads}
    while any(at[s] < len(reads[s]) for s in reads):
        moved = False
        for s in reads:
            while at[s] < len(reads[s]):
                name, action = reads[s][at[s]]
                if action == COMPUTE:
                    clock[s] += seconds[name]
                    stored[name] = clock[s]
                    timeline[s].append((name, clock[s]))
                elif name in stored:
                    if stored[name] > clock[s]:
                        idle[s] += stored[name] - clock[s]
                        timeline[s].append((f"(waited for {name})", stored[name]))
                        clock[s] = stored[name]
                else:
                    break  # the other side has not computed it yet
                at[s] += 1
                moved = True
        if not moved:
            raise SystemExit(f"the two sides wait for each other: {at}")
    return clock, idle, timeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seconds", help="JSON of per-stage seconds, or a timings.json")
    ap.add_argument("--preset", default="standard")
    args = ap.parse_args()
    doc = json.loads(Path(args.seconds).read_text())
    seconds = doc.get("computed_s", doc)
    reads = {side: stage_reads(partial(side_plan, side), preset=args.preset)[0] for side in SIDES}
    missing = sorted({name for r in reads.values() for name, how in r if how == COMPUTE} - set(seconds))
    if missing:
        raise SystemExit(f"no time for stages: {', '.join(missing)}")
    clock, idle, timeline = replay(reads, seconds)
    for side in SIDES:
        print(f"{side} side: ends at {clock[side] / 60:.1f} min, idle {idle[side] / 60:.1f} min")
        for event, t in timeline[side]:
            print(f"  {t / 60:7.1f} min  {event}")
    print(f"one pair on 2 workers (estimate): {max(clock.values()) / 60:.1f} min; "
          f"one process (sum of stage times): {sum(seconds.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
