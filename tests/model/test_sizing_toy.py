"""Circuit-form ceilings on a toy Llama: the "every head at every position" check equals the model,
and the form / floor accuracies are the runner's own keep sets."""

from __future__ import annotations

import pytest
import torch

from etbench.mech.heads import head_map
from etbench.metrics.ablation import AblationRunner, mean_activations
from etbench.metrics.sizing import ceilings, every_head_kept_correct, form_all_heads
from etbench.models.toy import tiny_llama, word_level_tokenizer
from etbench.schema.circuit import POSITION_CLASSES
from etbench.task import prompts
from etbench.task.layout import layouts

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def toy():
    tok = word_level_tokenizer()
    model = tiny_llama(len(tok), n_layers=2, n_heads=4, d_model=32, seed=3)
    hm = head_map(model)
    lays = layouts(prompts.generate(n_boxes=3, n=12, seed=0), tok)
    mean = mean_activations(model, tok, hm, 3, 16, 0, 8)
    return model, hm, lays, mean


def test_every_head_kept_equals_the_model(toy):
    model, hm, lays, mean = toy
    runner = AblationRunner(model, hm, lays, mean, 8)
    assert every_head_kept_correct(runner) == runner.correct()


def test_ceilings_on_a_toy_model(toy):
    model, hm, lays, mean = toy
    runner = AblationRunner(model, hm, lays, mean, 8)
    c = ceilings(runner)
    assert c.model.value == c.every_head_every_position.value
    form = runner.correct(keep={pc: {(layer, head) for layer in range(2) for head in range(4)}
                                for pc in POSITION_CLASSES})
    assert c.form_all_heads.k == sum(form)
    assert c.no_heads.k == sum(runner.correct(keep={}))
    assert form_all_heads(2, 4)["last"] == {(layer, head) for layer in range(2) for head in range(4)}


def test_discover_sized_by_faithfulness_records_ceilings_and_growth():
    from etbench.metrics.discovery import discover

    tok = word_level_tokenizer()
    model = tiny_llama(len(tok), n_layers=2, n_heads=4, d_model=32, seed=3)
    res = discover(model, "fast", tok, n_boxes=3, n=4, batch_size=4, minimality_mode="none", mean_n=4,
                   size="faithfulness", sizing_n=6, model_name="toy")
    assert res.ceilings is not None and res.growth is not None
    assert res.ceilings.n == 6 and res.parameters["size"] == "faithfulness"
    # the circuit is the growth's choice (A loses heads B also holds: the same kept set)
    for g in ("position_transmitter", "position_detector", "structure_reader"):
        assert len(res.circuit.groups[g]) == res.growth.chosen[g]
    assert res.to_dict()["growth"]["target_fraction"] == 0.9
    from etbench.metrics.discovery import format_discovery

    assert "size by faithfulness on 6 held-out prompts" in format_discovery(res)


def test_discover_rejects_a_bad_target_before_any_work():
    from etbench.core.errors import EtbenchError
    from etbench.metrics.discovery import discover

    tok = word_level_tokenizer()
    model = tiny_llama(len(tok), n_layers=2, n_heads=4, d_model=32, seed=3)
    with pytest.raises(EtbenchError, match="target fraction"):
        discover(model, "fast", tok, size="faithfulness", target_fraction=1.5)
    with pytest.raises(EtbenchError, match="size rule"):
        discover(model, "fast", tok, size="biggest")
