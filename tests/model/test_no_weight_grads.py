"""No analysis leaves a gradient on a model weight (issue #15): every stage of ``etbench score`` runs
on models loaded as ``from_pretrained`` returns them (every parameter ``requires_grad=True``), and
afterwards no parameter holds ``.grad``. A ``.backward()`` anywhere in discovery, DCM or CMAP would
fill them (on Llama-7B a resident 13.5 GB in bf16)."""

import pytest
import torch

from etbench import models
from etbench.models import toy
from etbench.scoring import pipeline as scoring
from etbench.scoring.presets import Preset
from support.toy_pair import write_toy_pair

MICRO = Preset("micro", accuracy_n=8, accuracy_boxes=(3,), discovery_mode="fast", discovery_n=8,
                       minimality_n=8, faithfulness_n=8, mean_n=8, random_draws=1, completeness_draws=1, dcm="quick",
                       dcm_seeds=(0,), cmap_n=8, cmap_variants=("output", "qkv"),
                       dcm_groups=("value_fetcher", "position_transmitter", "position_detector", "structure_reader"))


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    return write_toy_pair(tmp_path_factory.mktemp("toy_pair"))


def test_no_parameter_holds_grad_after_any_stage(toy_pair, tmp_path, monkeypatch):
    loaded = []
    real_load = models.load

    def recording_load(*args, **kwargs):
        m = real_load(*args, **kwargs)
        loaded.append(m.model)
        return m

    monkeypatch.setattr(models, "load", recording_load)
    # base: a given circuit (DCM, semantics and CMAP get heads); ft: fast discovery (attribution backward)
    run = scoring.score(str(toy_pair / "base"), str(toy_pair / "ft"), tmp_path / "out", preset=MICRO, progress=False,
                        circuit_base=str(toy_pair / "circuit.json"))
    assert "circuit_ft" not in run.cached_stages and "dcm_base_seed0" not in run.cached_stages
    assert len(loaded) == 2
    for model in loaded:
        params = list(model.parameters())
        assert params and all(p.requires_grad for p in params)  # as loaded: nothing froze them for the test
        holding = [name for name, p in model.named_parameters() if p.grad is not None]
        assert not holding, f"{len(holding)}/{len(params)} parameters hold .grad, e.g. {holding[:3]}"


def test_fast_discovery_leaves_no_weight_grad():
    from etbench.metrics.discovery import discover

    tok = toy.word_level_tokenizer()
    model = toy.tiny_llama(len(tok), n_layers=2, n_heads=4, seed=1)
    assert all(p.requires_grad for p in model.parameters())
    discover(model, "fast", tok, n_boxes=3, n=4, batch_size=4, minimality_mode="none", mean_n=4)
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
