"""Measure a row's ``robustness.json`` (``metrics.robustness``): its models and circuits in every wording, and
the diffing view of the pair. The base side depends only on the base, its circuit and the sizes, so rows of one
base share it (``BaseSideCache``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from etbench import models
from etbench.core.checks import check_items
from etbench.core.errors import EtbenchError
from etbench.core.io import check_output_dir
from etbench.metrics.diffing import model_diff
from etbench.metrics.robustness import (
    MODELS,
    DiffItems,
    Robustness,
    WordingItems,
    card_circuits,
    card_mean_n,
    card_sha256,
    check_outputs,
    paper_rows,
    summarise,
)
from etbench.metrics.wordings import CircuitWordingRow, circuit_by_wording
from etbench.schema import scorecard as sc
from etbench.schema.circuit import Circuit
from etbench.task.prompts import DEFAULT_WORDING, WORDINGS

#: Sizes chosen by measured cost (docs/method.md §14): items per wording and model, mean-ablation prompts per
#: held-out wording and model, diffing prompts. The paper wording's rows are the scorecard's own (its first n
#: faithfulness items), so only the held-out wordings are run.
DEFAULT_N = 100
DEFAULT_MEAN_N = 50
DEFAULT_DIFF_N = 50
N_BOXES = 7


def check_sizes(n: int, mean_n: int, diff_n: int) -> None:
    check_items(n, "--n")
    check_items(mean_n, "--mean-n")
    check_items(diff_n, "--diff-n")
    if n < 2 or diff_n < 2:
        raise EtbenchError("--n and --diff-n must be at least 2 (paired intervals need two items)")


@dataclass
class BaseSideCache:
    """The base model loaded once, and its circuit's rows per (circuit, sizes, seed), for several rows."""

    loaded: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, tuple[list[CircuitWordingRow], float]] = field(default_factory=dict)


def _circuit(heads: dict[str, list[list[int]]], card: sc.Scorecard, name: str) -> Circuit:
    return Circuit.from_heads(heads, n_layers=card.base.n_layers, n_heads=card.base.n_heads, model=name,
                              method="scorecard")


def _items(rows: list[CircuitWordingRow], model: str) -> list[WordingItems]:
    return [WordingItems(r.wording, model, list(r.model_correct), list(r.circuit_correct)) for r in rows]


def check_row(row_dir: Path, n: int) -> tuple[sc.Scorecard, dict[str, Circuit]]:
    """Everything about a row that can be wrong, before a model loads: its scorecard reads, names a base and a
    fine-tuned circuit that fit the models, holds ``n`` paper-wording items of each, the models resolve, and
    ``robustness.json`` there is not someone else's. Returns the card and its two circuits."""
    card_path = row_dir / "scorecard.json"
    if not card_path.is_file():
        raise EtbenchError(f"{row_dir}: no scorecard.json there")
    card = sc.load(card_path)
    circuits = card_circuits(card)
    card_mean_n(card)
    items = sc.load_items(card_path, card)
    for m in MODELS:
        paper_rows(items, m, N_BOXES, n)
    built = {m: _circuit(circuits[m], card, m) for m in MODELS}
    for m in MODELS:
        built[m].validate(card.base.n_layers, card.base.n_heads, f"the scorecard's {m} model")
    for ref in (card.base.ref, card.ft.ref):
        models.resolve(ref)
    check_output_dir(row_dir, str(row_dir))
    check_outputs(row_dir)
    return card, built


def measure(row_dir: str | Path, *, n: int = DEFAULT_N, mean_n: int = DEFAULT_MEAN_N, diff_n: int = DEFAULT_DIFF_N,
            batch_size: int = 16, cache: Optional[BaseSideCache] = None, progress: bool = False,
            status: Callable[[str], None] = lambda line: None) -> Robustness:
    """The robustness file of the row in ``row_dir`` (``scorecard.json`` + items): its base with the base circuit
    and its fine-tune with its own circuit in every wording, and the diffing view of the pair."""
    row_dir = Path(row_dir)
    check_sizes(n, mean_n, diff_n)
    card, built = check_row(row_dir, n)
    card_path = row_dir / "scorecard.json"
    items = sc.load_items(card_path, card)
    paper = {m: paper_rows(items, m, N_BOXES, n) for m in MODELS}  # before any model runs: the card holds n
    circuits = card_circuits(card)
    seed = int(card.config.get("seed", 0))
    cache = cache if cache is not None else BaseSideCache()
    held_out = [w for w in WORDINGS if w != DEFAULT_WORDING]
    kw = dict(n_boxes=N_BOXES, n=n, mean_n=mean_n, seed=seed, batch_size=batch_size, progress=progress,
              wordings=held_out)
    wall: dict[str, float] = {}
    if card.base.ref not in cache.loaded:
        status(f"loading {card.base.ref}")
        cache.loaded = {card.base.ref: models.load(card.base.ref)}  # one base held at a time
    base = cache.loaded[card.base.ref]
    key = json.dumps([card.base.ref, circuits["base"], kw], sort_keys=True)
    if key not in cache.rows:
        status(f"{card.base.ref} with the base circuit in {', '.join(held_out)} ({n} items, mean over {mean_n})")
        t0 = time.perf_counter()
        rows = circuit_by_wording(base, built["base"], model_name=card.base.ref, **kw)
        cache.rows[key] = rows, time.perf_counter() - t0
    base_rows, wall["base_wordings"] = cache.rows[key]
    status(f"loading {card.ft.ref}")
    ft = models.load(card.ft.ref)
    status(f"{card.ft.ref} with its circuit in {', '.join(held_out)}")
    t0 = time.perf_counter()
    ft_rows = circuit_by_wording(ft, built["ft"], model_name=card.ft.ref, **kw)
    wall["ft_wordings"] = time.perf_counter() - t0
    status(f"model diff {card.base.ref} -> {card.ft.ref} on {diff_n} prompts")
    t0 = time.perf_counter()
    d = model_diff(base, ft, n_boxes=N_BOXES, n=diff_n, seed=seed, batch_size=batch_size)
    wall["diff"] = time.perf_counter() - t0
    diff = DiffItems(diff_n, d.residual_items, d.heads, d.weight_delta, d.weight_rank)
    rows = [paper["base"], paper["ft"]] + _items(base_rows, "base") + _items(ft_rows, "ft")
    wordings = [DEFAULT_WORDING] + held_out
    return Robustness(row_dir.name, card.base.ref, card.ft.ref, card_sha256(card),
                      seed, N_BOXES, n, mean_n, card_mean_n(card), wordings, circuits, rows, diff,
                      summarise(rows, diff, circuits, wordings, seed), {k: round(v, 1) for k, v in wall.items()})
