"""The kept-ablation file of a planted adapter: malformed files are one error, refused before any model loads,
and an ablation made for another head layout is never folded (toy tensors and stand-in modules, no model)."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from etbench.core.errors import EtbenchError
from etbench.models.kept_ablation import (
    KEPT_ABLATION_FILE,
    KeptAblation,
    fold_kept_ablation,
    load_kept_ablation,
    save_kept_ablation,
)
from etbench.models.registry import ModelSpec

# the module (etbench.models re-exports its load() function under the same name)
load_module = importlib.import_module("etbench.models.load")


def _write(path, mean_z, heads=(0, 2), meta=None):
    save_file({"layer.1.heads": torch.tensor(heads, dtype=torch.int64), "layer.1.mean_z": mean_z}, str(path),
              metadata=meta or {"n_layers": "2", "n_heads": "4", "d_head": "3"})


def test_a_good_file_round_trips(tmp_path):
    ablation = KeptAblation(2, 4, 3, {1: ((0, 2), torch.randn(2, 3))})
    save_kept_ablation(ablation, tmp_path / KEPT_ABLATION_FILE)
    back = load_kept_ablation(tmp_path / KEPT_ABLATION_FILE)
    assert back.removed_heads() == {(1, 0), (1, 2)} and torch.equal(back.removed[1][1], ablation.removed[1][1])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_mean_is_refused(tmp_path, bad):
    # folded into the output projection's bias, one NaN makes every logit of the model NaN
    mean_z = torch.zeros(2, 3)
    mean_z[1, 2] = bad
    _write(tmp_path / KEPT_ABLATION_FILE, mean_z)
    with pytest.raises(EtbenchError, match="not a kept-ablation file.*finite"):
        load_kept_ablation(tmp_path / KEPT_ABLATION_FILE)


class _Attention(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.o_proj = torch.nn.Linear(in_features, out_features, bias=False)


class _StandIn(torch.nn.Module):
    """Only what the fold touches: config, get_decoder().layers[i].self_attn.o_proj (8 heads of width 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=8, head_dim=4, hidden_size=16)
        self.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
        for layer in self.layers:
            layer.self_attn = _Attention(32, 16)

    def get_decoder(self):
        return self


def test_an_ablation_for_another_head_layout_of_the_same_width_is_not_folded():
    # 4 heads of width 8 read the same 32 features as the model's 8 heads of width 4: folding it would zero
    # half of two heads each instead of the heads it names
    model = _StandIn()
    before = model.layers[1].self_attn.o_proj.weight.clone()
    with pytest.raises(EtbenchError, match="8 heads"):
        fold_kept_ablation(model, KeptAblation(2, 4, 8, {1: ((0,), torch.zeros(1, 8))}))
    assert torch.equal(model.layers[1].self_attn.o_proj.weight, before)
    fold_kept_ablation(model, KeptAblation(2, 8, 4, {1: ((0,), torch.ones(1, 4))}))
    assert not model.layers[1].self_attn.o_proj.weight[:, :4].any()


def test_a_malformed_kept_ablation_is_refused_before_the_base_model_loads(tmp_path, monkeypatch):
    (tmp_path / "adapter_config.json").write_text('{"target_modules": ["q_proj"]}')
    (tmp_path / KEPT_ABLATION_FILE).write_bytes(b"not safetensors")

    def base_loaded(*args, **kwargs):
        raise AssertionError("the base model was loaded before the kept ablation was read")

    monkeypatch.setattr(load_module, "_load_spec", base_loaded)
    spec = ModelSpec(ref="planted", kind="peft", location=str(tmp_path),
                     base=ModelSpec(ref="base", kind="directory", location=str(tmp_path / "base")))
    with pytest.raises(EtbenchError, match=KEPT_ABLATION_FILE):
        load_module._load_peft(spec, torch.float32, "cpu", False)
    (tmp_path / "adapter_config.json").write_text('{"target_modules": ["q_proj", "o_proj"]}')
    with pytest.raises(EtbenchError, match="o_proj"):
        load_module._load_peft(spec, torch.float32, "cpu", False)


@pytest.mark.parametrize("targets", ['"all-linear"', '".*o_proj"', '["self_attn.o_proj", "q_proj"]', '["o_proj"]',
                                     '"model.layers.0.self_attn.o_proj"'])
def test_an_adapter_reading_the_removed_heads_through_o_proj_is_refused_however_it_names_it(tmp_path, targets):
    # peft matches a list entry as a module-name suffix, a string as a regex over the full name, and
    # "all-linear" as every linear layer: each of these puts a LoRA on o_proj
    from etbench.models.kept_ablation import check_adapter_compatible

    (tmp_path / "adapter_config.json").write_text(f'{{"target_modules": {targets}}}')
    with pytest.raises(EtbenchError, match="o_proj"):
        check_adapter_compatible(tmp_path)


@pytest.mark.parametrize("targets", ['["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]',
                                     '"q_proj|v_proj"', '".*(q|v)_proj"', "null"])
def test_an_adapter_that_leaves_o_proj_alone_is_accepted(tmp_path, targets):
    from etbench.models.kept_ablation import check_adapter_compatible

    (tmp_path / "adapter_config.json").write_text(f'{{"target_modules": {targets}}}')
    check_adapter_compatible(tmp_path)


@pytest.mark.parametrize("tensors, message", [
    ({"layer.1.heads": torch.tensor([0.7, 2.0]), "layer.1.mean_z": torch.zeros(2, 3)}, "integer"),  # was head 0
    ({"layer.1.heads": torch.tensor([0, 2]), "layer.1.mean_z": torch.zeros(2, 3),
      "layer.0.mean_z": torch.zeros(1, 3)}, "unexpected tensors"),  # a mean without its heads: was ignored
    ({"layer.1.extra.heads": torch.tensor([0]), "layer.1.mean_z": torch.zeros(1, 3)}, "unexpected tensors"),
    ({"weights": torch.zeros(1)}, "unexpected tensors"),
])
def test_a_file_of_another_shape_is_refused(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / KEPT_ABLATION_FILE), metadata={"n_layers": "2", "n_heads": "4", "d_head": "3"})
    with pytest.raises(EtbenchError, match=f"not a kept-ablation file.*{message}"):
        load_kept_ablation(tmp_path / KEPT_ABLATION_FILE)


def test_a_file_that_removes_no_head_is_refused(tmp_path):
    save_file({}, str(tmp_path / KEPT_ABLATION_FILE), metadata={"n_layers": "2", "n_heads": "4", "d_head": "3"})
    with pytest.raises(EtbenchError, match="removes no head"):
        load_kept_ablation(tmp_path / KEPT_ABLATION_FILE)
