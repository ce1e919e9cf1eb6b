"""Edge scores on a random toy: one edge is path patching with one receiver; a null pair shows no rewiring;
a head removed in the 'fine-tuned' copy loses exactly its edges."""

from __future__ import annotations

import copy

import pytest
import torch

from etbench.core.io import read_json
from etbench.mech.heads import head_map
from etbench.metrics.discovery import discovery_pairs, path_patching_scores
from etbench.metrics.edge_comparison import reachable_edges
from etbench.metrics.edges import (
    EDGE_TYPES,
    EdgeComparison,
    EdgeScores,
    compare_edges,
    compare_models,
    edge_scores,
    write_edges,
)
from etbench.models.load import LoadedModel
from etbench.models.toy import tiny_llama, word_level_tokenizer
from etbench.schema.circuit import Circuit

torch.set_num_threads(min(2, torch.get_num_threads()))

N_LAYERS, N_HEADS, D_MODEL = 3, 4, 32
D_HEAD = D_MODEL // N_HEADS
#: D in layer 0, C in layers 0-1, B in layer 1, A in layer 2: every edge type has reachable and unreachable edges
NODES = {"structure_reader": [(0, 0), (0, 1)], "position_detector": [(1, 0), (1, 1), (0, 2)],
         "position_transmitter": [(1, 2), (1, 3)], "value_fetcher": [(2, 0), (2, 1), (2, 2), (2, 3)]}
KW = dict(n_boxes=3, n=8, batch_size=4, seed=1)


@pytest.fixture(scope="module")
def toy():
    tok = word_level_tokenizer()
    model = tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL, seed=3).double()
    return model, tok, edge_scores(model, NODES, tok, model_name="toy", **KW)


def test_an_edge_is_path_patching_through_one_receiver(toy):
    model, tok, scores = toy
    hm = head_map(model)
    _, _, _, encoded = discovery_pairs(tok, KW["n_boxes"], KW["n"], KW["seed"])
    by_type = {t: scores.of_type(t) for t in ("D->C", "C->B", "B->A", "A->logits")}
    # reachable edges only: D(0,*) -> C(1,*); C(0,2) -> B(1,*); every B -> every A; every A -> logits
    assert [len(by_type[t]) for t in by_type] == [4, 2, 8, 4]
    group = {"D->C": "structure_reader", "C->B": "position_detector", "B->A": "position_transmitter",
             "A->logits": "value_fetcher"}
    for t, edges in by_type.items():
        for e in edges:
            receivers = [] if e.receiver is None else [e.receiver]
            ref = path_patching_scores(model, hm, encoded, group[t], receivers, [e.sender], batch_size=8)
            assert e.score == pytest.approx(ref[e.sender], abs=1e-12)
    assert any(abs(e.score) > 0 for e in scores.edges)


def test_the_scored_edges_are_the_reachable_edges_submit_expects(toy):
    """``edge_comparison.reachable_edges`` (what ``submit`` requires of a card's rows, without a model) lists
    exactly the edges path patching scored, in their order, here with 2 query heads per KV head."""
    tok = word_level_tokenizer()
    gqa = tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL, n_kv_heads=2, seed=4).double()
    for model, scores in ((toy[0], toy[2]), (gqa, edge_scores(gqa, NODES, tok, model_name="gqa", **KW))):
        group_size = head_map(model).spec.group_size
        assert scores.parameters["kv_group_size"] == group_size
        assert [e.key for e in scores.edges] == reachable_edges(NODES, [t.name for t in EDGE_TYPES], group_size)
    assert head_map(gqa).spec.group_size == 2


def test_identical_pair_shows_no_rewiring(toy):
    model, tok, scores = toy
    again = edge_scores(copy.deepcopy(model), NODES, tok, model_name="copy", **KW)
    assert [e.effects for e in again.edges] == [e.effects for e in scores.edges]
    for row in compare_edges(scores, again).rows:
        assert row.rewiring.value == 0.0 and row.base_edges_share.value == 1.0


def test_a_removed_value_fetcher_loses_exactly_its_edges(toy):
    """The planted change: the receiver of the base's strongest B->A edge gets W_O = 0 in the 'fine-tune'.
    Its edges (B -> it, it -> logits) carry exactly nothing there, so the B->A top edges rewire."""
    model, tok, scores = toy
    strongest = max(scores.of_type("B->A"), key=lambda e: abs(e.score))
    layer, head = strongest.receiver
    ft = copy.deepcopy(model)
    with torch.no_grad():
        ft.model.layers[layer].self_attn.o_proj.weight[:, head * D_HEAD:(head + 1) * D_HEAD] = 0
    planted = edge_scores(ft, NODES, tok, model_name="planted", **KW)
    for e_base, e_ft in zip(scores.edges, planted.edges):
        into = e_ft.receiver == (layer, head) if e_ft.type == "B->A" else (
            e_ft.type == "A->logits" and e_ft.sender == (layer, head))
        if into:
            assert all(x == 0.0 for x in e_ft.effects) and any(x != 0.0 for x in e_base.effects)
    row = compare_edges(scores, planted).row("B->A")
    assert row.rewiring.value > 0 and row.base_edges_share.value < 1


def test_compare_models_scores_the_chosen_types_on_the_circuits_nodes(toy, tmp_path):
    model, tok, scores = toy
    circuit = Circuit.from_heads(NODES, n_layers=N_LAYERS, n_heads=N_HEADS)
    pair = [LoadedModel(ref, ref, m, tok) for ref, m in (("a", model), ("b", copy.deepcopy(model)))]
    base, ft, cmp = compare_models(*pair, circuit, circuit, k=4, types=["B->A", "A->logits"], n_boxes=3, n=8,
                                   batch_size=4, seed=1)
    assert {e.type for e in base.edges} == {"B->A", "A->logits"}
    assert [e.effects for e in base.edges] == [e.effects for e in scores.edges if e.type in ("B->A", "A->logits")]
    assert [r.type for r in cmp.rows] == ["B->A", "A->logits", "all"] and cmp.row("all").rewiring.value == 0.0
    written = write_edges(tmp_path, base, ft, cmp)
    assert EdgeScores.from_dict(read_json(written[0])).edges == base.edges
    assert EdgeComparison.from_dict(read_json(written[2])) == cmp
