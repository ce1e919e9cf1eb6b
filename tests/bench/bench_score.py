"""Benchmark (prints figures; not a test): the whole scorecard of a model pair, stage by stage, in machine units.

Runs ``etbench score`` from an empty output directory (nothing cached) and prints, per computed stage, its
wall time in machine units, its peak resident memory and the token positions it ran through the models
(``timings.json``'s ``passes``): forward, backward, and the lower bound of the protocol as measured here,
the forward tokens less those that repeated an unpatched row an earlier stage (or the same one) had already
run on the same model (each distinct prompt once per model), plus the backward ones; cost and bound weigh a
backward token as 2 forward ones (its FLOPs). Patched runs are all taken as distinct and KV-prefix sharing
is not credited, so the true bound can be lower: a ratio near 1 says no unpatched prompt was run twice, not
that the stage is at its limit. A stage's parts (faithfulness) are indented and inside its figures.

The machine unit is ``etbench.core.machine_unit.machine_unit_seconds()`` (100 x a 1024^2 fp32 matmul, best of
3), timed before and after the run; units use their mean. On a machine shared with other processes every
one of them shows up in the figures: say so beside them.

    python tests/bench/bench_score.py                      # the embedded pair, quick preset
    python tests/bench/bench_score.py --threads 2 --out /tmp/score-bench
    python tests/bench/bench_score.py --preset standard --ft tiny-goat --reuse-stages /tmp/score-bench
        # the cost of one more fine-tune of a base already scored (its base-side stages copied)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def cost(passes: dict[str, int]) -> tuple[int, int]:
    """(token positions run, the bound): backward tokens weigh 2 forward ones."""
    back = 2 * passes["backward_tokens"]
    return passes["forward_tokens"] + back, passes["forward_tokens"] - passes["repeated_tokens"] + back


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny-base")
    ap.add_argument("--ft", default="tiny-ft")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="output directory, new or empty (a stage cache left in it would be timed as "
                    "nothing); default a temp dir")
    ap.add_argument("--reuse-stages", action="append", default=[], metavar="DIR",
                    help="an earlier run's output directory: its stages with the same inputs are copied, not timed")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_score_"))
    # a benchmark never deletes what it did not create: a used directory is refused, not emptied
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"bench_score: error: --out {out} exists and is not an empty directory", file=sys.stderr)
        raise SystemExit(2)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from etbench.api import score  # what `etbench score` runs (scorecard + report)
    from etbench.core.machine_unit import machine_unit_seconds
    from etbench.publish.terminal import format_scorecard
    from etbench.scoring.graph import instances
    from etbench.scoring.presets import resolve_preset

    unit_before = machine_unit_seconds()
    start = time.perf_counter()
    run = score(args.base, args.ft, out, preset=args.preset, seed=args.seed, progress=False,
                reuse_stages=args.reuse_stages)
    total = time.perf_counter() - start
    unit_after = machine_unit_seconds()
    unit = (unit_before + unit_after) / 2
    print(format_scorecard(run.card))
    print(f"\n{args.base} -> {args.ft}, preset {args.preset}, torch threads {torch.get_num_threads()}")
    print(f"machine unit (100 x 1024^2 fp32 matmul, best of 3): {unit_before:.3f} s before, {unit_after:.3f} s after")
    preset = resolve_preset(args.preset)
    parts = {inst.format(part, preset) for inst in instances(preset) for part in inst.stage.parts}
    head = (f"{'stage':28} {'units':>7} {'wall s':>8} {'RSS MB':>7} {'calls':>6} {'fwd tok':>9} {'bwd tok':>8} "
            f"{'repeat':>8} {'bound':>9} {'ratio':>6}")
    print(head)
    totals = [0.0, 0, 0]
    for name, secs in run.timings.items():
        passes = run.passes.get(name)
        ran, bound = cost(passes) if passes else (0, 0)
        if name not in parts:
            totals[0] += secs
            totals[1] += ran
            totals[2] += bound
        label = ("  " if name in parts else "") + name
        row = f"{label:28} {secs / unit:>7.1f} {secs:>8.1f} {run.peak_rss_mb.get(name, float('nan')):>7.0f}"
        if passes:
            ratio = ran / bound if bound else None  # a stage that runs no pass (loading) has no ratio
            row += (f" {passes['calls']:>6} {passes['forward_tokens']:>9} {passes['backward_tokens']:>8} "
                    f"{passes['repeated_tokens']:>8} {bound:>9} {'—' if ratio is None else f'{ratio:.2f}':>6}")
            if ratio is not None and ratio > 3:
                row += f"  over 3x: {passes['repeated_tokens']} forward tokens repeat unpatched rows already run"
        print(row)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'stages (parts not re-added)':28} {totals[0] / unit:>7.1f} {totals[0]:>8.1f} {'':>7} {'':>6} "
          f"{totals[1]:>9} {'':>8} {'':>8} {totals[2]:>9} {totals[1] / max(totals[2], 1):>6.2f}")
    print(f"{'total (incl. loads)':28} {total / unit:>7.1f} {total:>8.1f} {peak:>7.0f}")
    # The protocol's cost floor as this machine runs it: the bound's tokens at the accuracy stages' rate (plain
    # batched forwards of whole prompts, the cheapest kind of pass a stage runs: 0.90 of lm-eval's wall time on
    # the same items). No stage can beat that rate much, so a unit target below this figure needs fewer tokens,
    # i.e. a change of protocol, not faster code.
    plain = [n for n in run.timings if n.startswith("accuracy_") and run.passes.get(n, {}).get("forward_tokens")]
    if plain:
        rate = sum(run.passes[n]["forward_tokens"] for n in plain) / sum(run.timings[n] / unit for n in plain)
        print(f"bound at the accuracy stages' rate ({rate:.0f} tokens a unit): {totals[2] / rate:.0f} units "
              f"(loads not included)")
    if run.cached_stages:
        print(f"from cache (not timed): {', '.join(run.cached_stages)}")
    print(json.dumps({"unit_s": [round(unit_before, 4), round(unit_after, 4)], "total_s": round(total, 2),
                      "total_units": round(total / unit, 1), "computed_s": run.timings, "passes": run.passes}))
    print(f"scorecard: {run.path}")


if __name__ == "__main__":
    main()
