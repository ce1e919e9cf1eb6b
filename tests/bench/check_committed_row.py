"""Check (prints figures; not a test): recompute a committed leaderboard row's DCM (first seed, both sides) and
CMAP with this code and compare them, item by item, with the row's committed items.

A change to how those stages compute (batching, merged runs, prefix reuse) that is meant to leave the standard
protocol's numbers unchanged is checked here: every DCM test item, every DCM selection and every CMAP item should
be equal. Costs about 2 minutes of DCM a side and 3 of CMAP on 2 CPU cores for a tiny row.

    python tests/bench/check_committed_row.py tiny-ft
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _committed(row: str) -> tuple[dict, list[dict]]:
    folder = ROOT / "submissions" / "results" / row
    card = json.loads((folder / "scorecard.json").read_text())
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines() if line]
    return card, items


def check_dcm(card: dict, items: list[dict], preset) -> bool:
    from etbench.metrics.dcm import dcm_preset, train_masks
    from etbench.models.load import load

    ok = True
    for circ in card["circuits"]:
        side, heads = circ["name"], {g: [tuple(h) for h in hs] for g, hs in circ["heads"].items()}
        m = load(circ["found_on"])
        groups = [g for g in preset.dcm_groups if heads.get(g)]
        seed = preset.dcm_seeds[0]
        t0 = time.perf_counter()
        result = train_masks(m.model, m.tokenizer, heads, dcm_preset(preset.dcm, seed=seed), groups=groups,
                             model_name=m.ref)
        got = {(r["group"], r["desideratum"], r["item"]): r["correct"] for r in result.item_rows(side)}
        want = {(r["group"], r["desideratum"], r["item"]): r["correct"] for r in items
                if r["measure"] == "dcm_test" and r["model"] == circ["found_on"]}
        selected = {(s["group"], s["desideratum"]): [tuple(h) for h in s["selected_heads"]]
                    for s in card["dcm_selections"] if s["circuit"] == side and s["seed"] == seed}
        differ = sum(got.get(k) != v for k, v in want.items())
        same_selections = {k: list(v) for k, v in result.selections().items()} == selected
        print(f"DCM {side} ({circ['found_on']}, seed {seed}, {time.perf_counter() - t0:.0f} s): {len(want)} committed "
              f"test items, {differ} differ; selections equal: {same_selections}", flush=True)
        ok &= differ == 0 and len(got) == len(want) and same_selections
    return ok


def check_cmap(card: dict, items: list[dict], preset) -> bool:
    from etbench.metrics.cmap import paper_patch_heads, run_cmap_sets
    from etbench.models.load import load
    from etbench.task.layout import usable_pool
    from etbench.task.prompts import generate

    circuit = next(c for c in card["circuits"] if c["name"] == "ft")
    base_ref = next(c for c in card["circuits"] if c["name"] == "base")["found_on"]
    heads = {g: [tuple(h) for h in hs] for g, hs in circuit["heads"].items()}
    selections = {(s["group"], s["desideratum"]): [tuple(h) for h in s["selected_heads"]]
                  for s in card["dcm_selections"] if s["circuit"] == "ft" and s["seed"] == preset.dcm_seeds[0]}
    base, ft = load(base_ref), load(circuit["found_on"])
    pool, labels = usable_pool(base.tokenizer, 7)
    examples = generate(n_boxes=7, n=preset.cmap_n, seed=card["config"]["seed"], objects=pool, labels=labels)
    sets = {"dcm": (paper_patch_heads(heads, selections), preset.cmap_variants), "circuit": (heads, ("output",))}
    t0 = time.perf_counter()
    results = run_cmap_sets(base.model, ft.model, base.tokenizer, sets, examples, tokenizer_ft=ft.tokenizer,
                            batch_size=preset.batch_size)

    def key(r):
        return (r["heads"], r["model"], r["variant"], r["group"], r["item"])

    got = {key({**r, "heads": label}): r["correct"] for label, res in results.items() for r in res.item_rows()}
    want = {key(r): r["correct"] for r in items if r["measure"] == "cmap"}
    differ = sum(got.get(k) != v for k, v in want.items())
    print(f"CMAP ({time.perf_counter() - t0:.0f} s): {len(want)} committed items, {differ} differ", flush=True)
    return differ == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", help="a committed row under submissions/results (a standard-preset scorecard)")
    parser.add_argument("--only", choices=("dcm", "cmap"))
    args = parser.parse_args(argv)
    from etbench.scoring.presets import SCORE_PRESETS

    card, items = _committed(args.row)
    preset = SCORE_PRESETS[card["config"]["preset"]["name"]]
    ok = True
    if args.only in (None, "dcm"):
        ok &= check_dcm(card, items, preset)
    if args.only in (None, "cmap"):
        ok &= check_cmap(card, items, preset)
    print("all equal" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
