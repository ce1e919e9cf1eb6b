"""Benchmark (prints figures; not a test): the whole scorecard of a model pair, stage by stage.

Runs ``etbench score`` from an empty output directory (nothing cached) and prints each stage's wall
time and peak resident memory, the total, and the scorecard's headline numbers. It first times one
plain 16 x 90-token forward pass of the base model (the "machine unit") and prints the total as a
multiple of it, so figures from machines of different speed can be compared. Run it on an idle
machine: on the 2-core reference machine every other process shows up in the figures.

    python tests/bench/bench_score.py                      # the embedded pair, quick preset
    python tests/bench/bench_score.py --threads 2 --out /tmp/score-bench
    python tests/bench/bench_score.py --preset standard --ft tiny-goat --reuse-stages /tmp/score-bench
        # the cost of one more fine-tune of a base already scored (its base-side stages copied)
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def calibrate(model_ref: str, repeats: int = 3) -> float:
    """Seconds of one plain forward pass of ``model_ref`` over a fixed 16 x 90-token batch of random
    tokens (a fixed shape, not a prompt: the same work on every machine; tiny-base's 7-box prompts are 53
    tokens): the machine's unit, so totals from different machines can be compared as multiples of it."""
    import torch

    from etbench.mech.forward import forward
    from etbench.models import load

    model = load(model_ref).model
    ids = torch.randint(100, 10_000, (16, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward(model, ids)  # warm-up: first-call allocations
        start = time.perf_counter()
        for _ in range(repeats):
            forward(model, ids)
    return (time.perf_counter() - start) / repeats


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
    from etbench.publish.terminal import format_scorecard

    unit = calibrate(args.base)
    start = time.perf_counter()
    run = score(args.base, args.ft, out, preset=args.preset, seed=args.seed, progress=False,
                reuse_stages=args.reuse_stages)
    total = time.perf_counter() - start
    print(format_scorecard(run.card))
    print(f"\n{args.base} -> {args.ft}, preset {args.preset}, torch threads {torch.get_num_threads()}")
    print(f"{'stage':22} {'wall s':>8} {'peak RSS MB':>12}")
    for name, secs in run.timings.items():
        print(f"{name:22} {secs:>8.1f} {run.peak_rss_mb.get(name, float('nan')):>12.0f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'total (incl. loads)':22} {total:>8.1f} {peak:>12.0f}")
    print(f"machine unit: one 16 x 90-token forward of {args.base} takes {unit:.2f} s; "
          f"total = {total / unit:.0f} units")
    if run.cached_stages:
        print(f"from cache (not timed): {', '.join(run.cached_stages)}")
    print(f"scorecard: {run.path}")


if __name__ == "__main__":
    main()
