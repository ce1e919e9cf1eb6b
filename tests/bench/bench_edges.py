"""Measurement (not a test): issue 28's edge known answers on the zoo, tiny-base against tiny-null and
tiny-planted-a, on the node set of each pair's committed circuits (``submissions/results/<row>/scorecard.json``).

Expected: tiny-null close to no rewiring; tiny-planted-a (trained with tiny-base's value fetchers knocked out)
rewired into A (B->A, A->logits) more than the null row. One thread per process; D->C is left out by default
(its runs recompute most of the prompt: the dearest type).

    OMP_NUM_THREADS=1 python tests/bench/bench_edges.py --n 32 --out /tmp/edges
    OMP_NUM_THREADS=1 python tests/bench/bench_edges.py --n 32 --type 'D->C' --row tiny-null

The file name does not match pytest's ``test_*.py`` pattern, so pytest never collects it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from etbench import models
from etbench.core.io import atomic_write_json, read_json
from etbench.metrics.edges import compare_edges, edge_nodes, edge_scores, format_edge_comparison
from etbench.schema.circuit import Circuit

ROOT = Path(__file__).resolve().parents[2]


def circuits(row: str) -> tuple[Circuit, Circuit]:
    card = read_json(ROOT / "submissions" / "results" / row / "scorecard.json")
    found = {c["name"]: Circuit.from_heads({g: [tuple(h) for h in hs] for g, hs in c["heads"].items()},
                                           n_layers=30, n_heads=9) for c in card["circuits"]}
    return found["base"], found["ft"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", action="append", help="zoo rows (default tiny-null and tiny-planted-a)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--type", action="append", help="edge types (default C->B, B->A, A->logits)")
    parser.add_argument("--out", type=Path, default=None, help="write edges and comparisons here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    types = args.type or ["C->B", "B->A", "A->logits"]
    base = models.load("tiny-base")
    for row in args.row or ["tiny-null", "tiny-planted-a"]:
        nodes = edge_nodes(*circuits(row))
        print(row, "nodes:", {g: len(h) for g, h in nodes.items()}, flush=True)
        t0 = time.perf_counter()
        scores = [edge_scores(base, nodes, n=args.n, types=types, model_name="tiny-base"),
                  edge_scores(models.load(row), nodes, n=args.n, types=types, model_name=row)]
        cmp = compare_edges(*scores)
        print(format_edge_comparison(cmp), f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.out is not None:
            for name, obj in zip(("base", "ft", "comparison"), (*scores, cmp)):
                atomic_write_json(args.out / f"edges_{row}_{name}_n{args.n}.json", obj.to_dict())


if __name__ == "__main__":
    main()
