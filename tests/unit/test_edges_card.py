"""The scorecard's ``edges`` section (schema 4), re-derived by ``etbench submit`` from its ``edge_effect`` rows.

The committed tiny-null card, taken back to schema 3 (its own edges section and edge_effect rows removed, as it was
scored before edges existed), gets a planted section: edge effects drawn at random on
the node set its circuits give, the strong B->A edges of the fine-tuned side moved to other receivers. The
section assembled from them must re-derive; every edit of a number, a row, the node set or a setting is refused
naming the field."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from etbench.core.errors import EtbenchError
from etbench.metrics import edge_comparison as ec
from etbench.metrics.discovery import PAPER_CANDIDATE_K, default_k
from etbench.publish import leaderboard as lb
from etbench.publish.rederive import rederive
from etbench.schema import scorecard as sc
from etbench.schema.circuit import Circuit

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "submissions" / "results" / "tiny-null" / "scorecard.json"
TYPES = ["C->B", "B->A", "A->logits"]
N = 32  # the standard preset's edge_n
MEMO: dict = {}  # rederive's memo: the card's other numbers are derived once for all the edits below


def _planted(card: sc.Scorecard) -> tuple[sc.Scorecard, list[dict]]:
    shape = {"n_layers": card.base.n_layers, "n_heads": card.base.n_heads}
    circuits = {c.name: Circuit.from_heads(c.heads, **shape) for c in card.circuits}
    node_k = default_k(shape["n_layers"] * shape["n_heads"], PAPER_CANDIDATE_K)
    nodes = ec.nodes_of(circuits["base"], circuits["ft"], node_k)
    keys = ec.reachable_edges(nodes, TYPES, 3)
    rng = np.random.default_rng(0)
    scores = {}
    for w in ("base", "ft"):
        effects = rng.normal(0, 0.02, size=(len(keys), N))
        b_to_a = [i for i, k in enumerate(keys) if k[0] == "B->A"]
        k = math.ceil(len(b_to_a) / 4)  # the top edges compare_edges takes: exactly the planted ones
        strong = b_to_a[:k] if w == "base" else b_to_a[-k:]
        effects[strong] -= 1.0
        params = {"n_boxes": 7, "n": N, "seed": 0, "batch_size": 8, "types": TYPES, "kv_group_size": 3}
        scores[w] = ec.EdgeScores(w, nodes, [ec.Edge(t, s, r, list(map(float, row)))
                                             for (t, s, r), row in zip(keys, effects)], N, params)
    section = ec.section_of(scores["base"], scores["ft"], node_k, 0)
    rows = ec.edge_rows(scores["base"], "base") + ec.edge_rows(scores["ft"], "ft")
    return replace(card, edges=section, schema_version=4), rows


@pytest.fixture(scope="module")
def planted():
    stored = sc.load(CARD)
    # the card as scored before `submit --add-edges` gave it its own section: schema 3, no edge rows
    card = replace(stored, edges=None, schema_version=3)
    items = [r for r in sc.load_items(CARD, stored) if r["measure"] != "edge_effect"]
    with_edges, rows = _planted(card)
    return card, items, with_edges, items + rows


def test_planted_section_re_derives_and_shows_the_planted_rewiring(planted):
    _, _, card, items = planted
    rederive(card, items, MEMO)
    b_to_a = lb.pick_rewiring(card)
    # the fine-tuned side's strong B->A edges are none of the base's: all rewired, far above chance (0.74)
    assert b_to_a.type == "B->A" and b_to_a.rewiring.value == 1.0 and b_to_a.n_common == 0
    assert lb.rewiring_chance(b_to_a) == pytest.approx(1 - b_to_a.k / b_to_a.n_candidates)
    # the JSON round trip keeps the section (and its NaN-free rows)
    again = sc.from_dict(sc.to_dict(card))
    assert again.edges == card.edges


def test_a_schema_3_card_without_edges_still_re_derives(planted):
    card, items, _, _ = planted
    assert card.schema_version == 3 and card.edges is None
    rederive(card, items, MEMO)


def _set_rewiring(card):
    e = card.edges
    rows = [replace(r, rewiring=replace(r.rewiring, value=0.05)) if r.type == "B->A" else r for r in e.rows]
    return replace(card, edges=replace(e, rows=rows)), r"edges \(B->A\) rewiring: value is 0.05 but the items give 1.0"


def _set_common(card):
    e = card.edges
    return replace(card, edges=replace(e, rows=[replace(r, n_common=r.n_common + 1) for r in e.rows])), "n_common"


def _set_share_ci(card):
    e = card.edges
    rows = [replace(r, base_edges_share=replace(r.base_edges_share, high=1.0)) for r in e.rows]
    return replace(card, edges=replace(e, rows=rows)), "base edges share"


def _set_chance(card):
    e = card.edges
    rows = [replace(r, chance=replace(r.chance, base_in_ft=0.5)) for r in e.rows]
    return replace(card, edges=replace(e, rows=rows)), "by chance"


def _drop_a_type(card):
    e = card.edges
    return replace(card, edges=replace(e, rows=[r for r in e.rows if r.type != "A->logits"])), "edges rows"


def _other_n(card):
    return replace(card, edges=replace(card.edges, n=16)), "edges n"


def _other_node_k(card):
    k = dict(card.edges.node_k, value_fetcher=3)
    return replace(card, edges=replace(card.edges, node_k=k)), "edges nodes"


def _on_schema_3(card):
    return replace(card, schema_version=3), "schema 3"


@pytest.mark.parametrize("edit", [_set_rewiring, _set_common, _set_share_ci, _set_chance, _drop_a_type, _other_n,
                                  _other_node_k, _on_schema_3])
def test_an_edited_section_is_refused_naming_the_field(planted, edit):
    _, _, card, items = planted
    forged, message = edit(card)
    with pytest.raises(EtbenchError, match=message):
        rederive(forged, items, MEMO)


def test_rows_that_do_not_cover_the_node_sets_edges_are_refused(planted):
    _, items, card, with_rows = planted
    edge_rows = [r for r in with_rows if r.get("measure") == ec.EDGE_MEASURE]
    first = next(r for r in edge_rows if r["model"] == "ft" and r["edge"] == "B->A")
    dropped = [r for r in edge_rows if not (r["model"] == "ft" and r["edge"] == "B->A" and r["layer"] ==
                                            first["layer"] and r["head"] == first["head"])]
    # every prompt of one sender's B->A edges on the ft side left out
    assert len(dropped) < len(edge_rows)
    with pytest.raises(EtbenchError, match="edges of ft"):
        rederive(card, items + dropped, MEMO)
    one_prompt_less = [r for r in edge_rows if not (r["model"] == "base" and r["item"] == N - 1)]
    with pytest.raises(EtbenchError, match="not prompts 0..31"):
        rederive(card, items + one_prompt_less, MEMO)
    # rows without a section: a section left out is not absent
    original = replace(card, edges=None)
    with pytest.raises(EtbenchError, match="edges: missing"):
        rederive(original, with_rows, MEMO)


def test_a_changed_effect_moves_the_section(planted):
    """The section is a function of the rows: an effect edited on the ft side (a base top edge made the ft's
    strongest) changes what the rows give, and the unchanged section is refused."""
    _, items, card, with_rows = planted
    base_top = next(r for r in with_rows if r.get("measure") == ec.EDGE_MEASURE and r["model"] == "base"
                    and r["edge"] == "B->A" and r["score"] is not None and r["score"] < -0.5)
    edited = [dict(r, score=-5.0) if (r.get("measure") == ec.EDGE_MEASURE and r["model"] == "ft"
                                      and r["edge"] == "B->A" and r["layer"] == base_top["layer"]
                                      and r["head"] == base_top["head"] and r["receiver"] == base_top["receiver"])
              else r for r in with_rows]
    assert edited != with_rows
    with pytest.raises(EtbenchError, match="edges \\(B->A\\)"):
        rederive(card, edited, MEMO)


def test_a_preset_that_scores_edges_requires_the_section(planted):
    card, items, _, _ = planted
    config = dict(card.config, preset=dict(card.config["preset"], edge_types=TYPES, edge_n=N))
    v4 = replace(card, config=config, config_hash=sc.config_hash(config), schema_version=4)
    with pytest.raises(EtbenchError, match="edges: missing \\(the card's preset scores edges\\)"):
        rederive(v4, items, MEMO)
    # the rows stay finite where the model's were: a NaN effect is a null score, and back
    assert all(r["score"] is None or math.isfinite(r["score"]) for r in ec.edge_rows(
        ec.EdgeScores("m", {}, [ec.Edge("A->logits", (1, 0), None, [math.nan, 0.5])], 2, {}), "base"))


def test_a_schema_3_card_relabelled_schema_4_is_refused(planted):
    """A card whose preset record predates edge settings is schema 4 only with a section added by
    ``submit --add-edges``; the bare relabel (found by test_submit_fuzz) is refused, while the same card with
    an empty edge_types record (as a quick-preset card of schema 4 records it) re-derives."""
    card, items, _, _ = planted
    with pytest.raises(EtbenchError, match="schema_version was edited"):
        rederive(replace(card, schema_version=4), items, MEMO)
    config = dict(card.config, preset=dict(card.config["preset"], edge_types=[], edge_n=N))
    rederive(replace(card, config=config, config_hash=sc.config_hash(config), schema_version=4), items, MEMO)
