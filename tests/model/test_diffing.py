"""The model-diffing view on toys with a known change: where it is, and nowhere else."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from etbench.metrics.diffing import ModelDiff, model_diff
from etbench.models.toy import tiny_llama, word_level_tokenizer

torch.set_num_threads(min(2, torch.get_num_threads()))
KW = dict(n=8, n_boxes=3, seed=1)


@pytest.fixture(scope="module")
def toy():
    tok = word_level_tokenizer()
    return tiny_llama(len(tok), n_layers=3, n_heads=4, d_model=32, seed=3), tok


def test_identical_models_differ_nowhere(toy):
    model, tok = toy
    d = model_diff(model, copy.deepcopy(model), tok, **KW)
    assert all(e.value == 0.0 for es in d.residual.values() for e in es)
    assert all(x == 0.0 for rows in d.heads.values() for r in rows for x in r)
    assert all(x == 0 for rows in d.weight_rank.values() for r in rows for x in r)
    assert ModelDiff.from_dict(json.loads(json.dumps(d.to_dict(), allow_nan=False))) == d


def test_a_planted_rank_one_change_of_one_heads_output(toy):
    """W_O's columns of head (1, 2) get a rank-1 change: the weights differ there only, with rank 1; the
    residual stream is unchanged after layer 0 and changed from layer 1 on; heads' z change only above layer 1."""
    model, tok = toy
    ft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ft.model.layers[1].self_attn.o_proj.weight[:, 16:24] += 0.1 * torch.outer(
            torch.randn(32, generator=gen), torch.randn(8, generator=gen))
    d = model_diff(model, ft, tok, **KW)
    for kind, rows in d.weight_rank.items():
        for layer, row in enumerate(rows):
            for head, r in enumerate(row):
                changed = (kind, layer, head) == ("z", 1, 2)
                assert r == (1 if changed else 0) and (d.weight_delta[kind][layer][head] > 0) == changed
    for es in d.residual.values():
        assert es[0].value == 0.0 and es[1].value > 0 and es[2].value > 0
    for rows in d.heads.values():
        assert all(x == 0.0 for r in rows[:2] for x in r) and all(x > 0 for x in rows[2])


def test_a_lora_counts_unmerged_as_merged(toy):
    """A rank-2 LoRA on q_proj: every q head slice changes with rank <= 2, nothing else; the unmerged adapter
    and the merged model give the same view."""
    from peft import LoraConfig, get_peft_model

    model, tok = toy
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                 init_lora_weights=False))
    unmerged = model_diff(model, peft_model, tok, **KW)
    merged = model_diff(model, copy.deepcopy(peft_model).merge_and_unload(), tok, **KW)
    assert all(0 < r <= 2 for row in unmerged.weight_rank["q"] for r in row)
    assert all(r == 0 for kind in "kvz" for row in unmerged.weight_rank[kind] for r in row)
    assert unmerged.weight_rank == merged.weight_rank
    for kind in unmerged.weight_delta:
        for a, b in zip(unmerged.weight_delta[kind], merged.weight_delta[kind]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-7)
    for pc in unmerged.residual:
        assert [e.value for e in unmerged.residual[pc]] == pytest.approx([e.value for e in merged.residual[pc]],
                                                                        rel=1e-3, abs=1e-6)
