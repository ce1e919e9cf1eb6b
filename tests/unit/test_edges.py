"""Edge comparison on planted edge scores (no model): known overlaps, chance levels, CIs and the file format."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import hypergeom

from etbench.core.errors import EtbenchError
from etbench.metrics.discovery import EDGE_RECEIVERS
from etbench.metrics.edges import (
    EDGE_TYPES,
    Edge,
    EdgeComparison,
    EdgeScores,
    compare_edges,
    edge_nodes,
    format_edge_comparison,
)
from etbench.metrics.overlap import Overlap, chance_overlap
from etbench.schema.circuit import Circuit

N_ITEMS = 24


def _scores(effects: dict[str, np.ndarray], name: str = "m") -> EdgeScores:
    """EdgeScores whose type t has edges 0..M-1 (sender (0, i), receiver (1, i)) with per-item ``effects[t]``."""
    edges = []
    for t in EDGE_TYPES:
        for i, row in enumerate(effects.get(t.name, [])):
            edges.append(Edge(t.name, (0, i), None if t.receiver is None else (1, i), [float(x) for x in row]))
    return EdgeScores(name, {}, edges, N_ITEMS, {"n_boxes": 7, "n": N_ITEMS, "seed": 0})


def _planted(rng, m: int, strong: list[int], strength: float = 1.0) -> np.ndarray:
    """M edges whose ``strong`` ones have mean effect -strength and the rest ~0, with item noise."""
    eff = rng.normal(0, 0.02, size=(m, N_ITEMS))
    eff[strong] -= strength
    return eff


def test_identical_models_show_no_rewiring_and_no_ci():
    rng = np.random.default_rng(0)
    eff = {t.name: rng.normal(size=(8, N_ITEMS)) for t in EDGE_TYPES}
    cmp = compare_edges(_scores(eff), _scores(eff), top_fraction=0.25)
    for row in cmp.rows:
        assert row.overlap.value == 1.0 and row.rewiring.value == 0.0 and row.base_edges_share.value == 1.0
        assert row.overlap.low is None and "same value in all" in row.overlap.note  # no width-zero CI
    assert [r.type for r in cmp.rows] == [t.name for t in EDGE_TYPES] + ["all"]


def test_planted_rewiring_shows_where_planted():
    """B->A's strong edges move to other receivers in the ft; every other type keeps its strong edges."""
    rng = np.random.default_rng(1)
    base = {t.name: _planted(rng, 12, [0, 1, 2]) for t in EDGE_TYPES}
    ft = {name: e + rng.normal(0, 0.02, size=e.shape) for name, e in base.items()}
    ft["B->A"] = _planted(rng, 12, [6, 7, 8])
    cmp = compare_edges(_scores(base), _scores(ft), top_fraction=0.25, n_resamples=500)
    for row in cmp.rows:
        if row.type == "B->A":
            assert row.k == 3 and row.n_common == 0 and row.rewiring.value == 1.0
            assert row.overlap.high == pytest.approx(0.0) or row.overlap.high is None
            assert row.base_edges_share.value < 0.1  # the ft's effect sits on other edges
            assert row.chance.base_in_ft == pytest.approx(3 / 12) and row.chance.p_value == 1.0
        elif row.type != "all":
            assert row.n_common == 3 and row.rewiring.value == 0.0
            assert row.base_edges_share.value == pytest.approx(1.0)
            assert row.chance.p_value == pytest.approx(hypergeom(12, 3, 3).sf(2))
    everything = cmp.row("all")
    assert everything.k == 12 and everything.n_common == 9 and everything.overlap.value == pytest.approx(0.75)


def test_ci_comes_from_resampling_prompts():
    """Two edges of nearly equal effect: which is on top depends on the prompts drawn, so the overlap's
    CI is wide; a clear winner gives none."""
    rng = np.random.default_rng(2)
    close = np.stack([-1 + rng.normal(0, 0.5, N_ITEMS), -1 + rng.normal(0, 0.5, N_ITEMS)])
    clear = np.stack([np.full(N_ITEMS, -1.0), np.full(N_ITEMS, -0.1)])
    close_ft = np.stack([-1 + rng.normal(0, 0.5, N_ITEMS), -1 + rng.normal(0, 0.5, N_ITEMS)])
    cmp = compare_edges(_scores({"B->A": close}), _scores({"B->A": close_ft}), top_fraction=0.5)
    row = cmp.row("B->A")
    assert row.overlap.low == 0.0 and row.overlap.high == 1.0
    cmp = compare_edges(_scores({"B->A": clear}), _scores({"B->A": clear}), top_fraction=0.5)
    assert cmp.row("B->A").overlap.low is None


def test_chance_levels():
    rng = np.random.default_rng(3)
    eff = {"D->C": rng.normal(size=(10, N_ITEMS)), "A->logits": rng.normal(size=(6, N_ITEMS))}
    other = {"D->C": rng.normal(size=(10, N_ITEMS)), "A->logits": rng.normal(size=(6, N_ITEMS))}
    cmp = compare_edges(_scores(eff), _scores(other), top_fraction=0.3)
    dc, al, pooled = cmp.row("D->C"), cmp.row("A->logits"), cmp.row("all")
    assert (dc.k, al.k) == (3, 2)
    assert dc.chance == chance_overlap(Overlap(3, 3, dc.n_common, 6 - dc.n_common), 10)
    # the pooled chance: expected common edges = sum k^2 / M over types, over sum k
    assert pooled.chance.base_in_ft == pytest.approx((9 / 10 + 4 / 6) / 5)
    draws = [hypergeom(10, 3, 3).rvs(size=200_000, random_state=4) + hypergeom(6, 2, 2).rvs(size=200_000,
                                                                                         random_state=5)]
    assert pooled.chance.p_value == pytest.approx(np.mean(draws[0] >= pooled.n_common), abs=0.005)


def test_nan_effects_rank_last():
    eff = np.full((3, N_ITEMS), -0.5)
    eff[0] = np.nan  # p_clean underflowed on every item: no score
    cmp = compare_edges(_scores({"A->logits": eff}), _scores({"A->logits": eff}), top_fraction=0.3)
    assert cmp.row("A->logits").overlap.value == 1.0


def test_round_trips_and_refusals(tmp_path):
    rng = np.random.default_rng(5)
    s = _scores({t.name: rng.normal(size=(4, N_ITEMS)) for t in EDGE_TYPES})
    s.edges[0].effects[3] = float("nan")
    text = json.dumps(s.to_dict(), allow_nan=False)  # strict JSON: NaN stored as null
    back = EdgeScores.from_dict(json.loads(text))
    assert [e.key for e in back.edges] == [e.key for e in s.edges] and np.isnan(back.edges[0].effects[3])
    cmp = compare_edges(s, back, n_resamples=100)
    again = EdgeComparison.from_dict(json.loads(json.dumps(cmp.to_dict(), allow_nan=False)))
    assert again == cmp
    assert "B->A" in format_edge_comparison(cmp)
    fewer = _scores({t.name: rng.normal(size=(3, N_ITEMS)) for t in EDGE_TYPES})
    with pytest.raises(EtbenchError, match="different edges"):
        compare_edges(s, fewer)
    other_prompts = _scores({t.name: rng.normal(size=(4, N_ITEMS)) for t in EDGE_TYPES})
    other_prompts.parameters["seed"] = 1
    with pytest.raises(EtbenchError, match="different prompts"):
        compare_edges(s, other_prompts)
    with pytest.raises(EtbenchError, match="top fraction"):
        compare_edges(s, s, top_fraction=0)
    with pytest.raises(EtbenchError, match="etbench-edges"):
        EdgeScores.from_dict({"format": "etbench-circuit"})


def test_edge_nodes_unite_each_circuits_top_heads():
    base = Circuit.from_heads({"value_fetcher": [(3, 0), (3, 1), (3, 2)], "position_transmitter": [(2, 0)]},
                              n_layers=4, n_heads=4)
    ft = Circuit.from_heads({"value_fetcher": [(3, 3), (3, 0)], "structure_reader": [(0, 1)]}, n_layers=4, n_heads=4)
    nodes = edge_nodes(base, ft, k=2)
    assert nodes["value_fetcher"] == [(3, 0), (3, 1), (3, 3)]
    assert nodes["position_transmitter"] == [(2, 0)] and nodes["structure_reader"] == [(0, 1)]
    with pytest.raises(EtbenchError, match="one head layout"):
        edge_nodes(base, Circuit.from_heads({"value_fetcher": [(0, 0)]}, n_layers=2, n_heads=4))


def test_the_torch_free_edge_types_are_path_patchings_hops():
    """``edge_comparison.EDGE_TYPES`` is written out (submit and the leaderboard import no torch); it must be the
    flow ``discovery.EDGE_RECEIVERS`` patches, upstream first."""
    want = [(g, r[0] if r else None, r[1] if r else "logits") for g, r in reversed(EDGE_RECEIVERS.items())]
    assert [(t.sender, t.receiver, t.site) for t in EDGE_TYPES] == want
    assert [t.name for t in EDGE_TYPES] == ["D->C", "C->B", "B->A", "A->logits"]
    code = "import sys, etbench.metrics.edge_comparison, etbench.publish.rederive; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0
