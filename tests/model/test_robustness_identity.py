"""Robustness's known answer for identity, on a toy: a model against its own copy answers alike in every
wording, its circuit carries over alike, the diffing view is zero everywhere, and the gain carry-over is 0."""

from __future__ import annotations

import copy

import torch

from etbench.metrics import robustness as rb
from etbench.metrics.diffing import model_diff
from etbench.metrics.wordings import circuit_by_wording
from etbench.models.toy import byte_level_bpe_tokenizer, tiny_llama
from etbench.schema.circuit import Circuit

torch.set_num_threads(min(2, torch.get_num_threads()))

HEADS = {"value_fetcher": [[1, 0], [1, 2]], "position_transmitter": [[0, 1]], "position_detector": [[0, 3]],
         "structure_reader": [[0, 0]]}


def test_a_model_against_its_copy():
    tok = byte_level_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    twin = copy.deepcopy(model)
    circuit = Circuit.from_heads(HEADS, n_layers=2, n_heads=4)
    kw = dict(n_boxes=3, n=24, mean_n=12, seed=1)
    by = {m: circuit_by_wording(x, circuit, tok, **kw) for m, x in (("base", model), ("ft", twin))}
    assert [r.wording for r in by["base"]] == ["paper", "stored", "bin"]
    for a, b in zip(by["base"], by["ft"]):
        assert a == b and len(a.model_correct) == 24
    d = model_diff(model, twin, tok, n_boxes=3, n=6, seed=1)
    diff = rb.DiffItems(6, d.residual_items, d.heads, d.weight_delta, d.weight_rank)
    rows = [rb.WordingItems(r.wording, m, r.model_correct, r.circuit_correct) for m in rb.MODELS for r in by[m]]
    circuits = {"base": HEADS, "ft": HEADS}
    s = rb.summarise(rows, diff, circuits, ["paper", "stored", "bin"], seed=1)
    assert s.gain_carryover.value == 0 and s.carryover["base"] == s.carryover["ft"]
    assert all(g.gain.value == 0 for g in s.gain)
    assert all(e.value == 0 for es in s.residual.values() for e in es)
    for g in s.groups:
        assert g.z_difference.value == 0
        assert all(e.value == 0 for e in g.weight_delta.values()) and all(e.value == 0 for e in g.weight_rank.values())
