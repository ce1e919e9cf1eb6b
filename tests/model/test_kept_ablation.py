"""A kept ablation folded into the weights (models.kept_ablation) equals replacing the removed heads' z by
their mean at run time; removed heads then carry nothing; an adapter directory with the file loads folded."""

import copy

import pytest
import torch

from etbench import models
from etbench.core.errors import EtbenchError
from etbench.mech.heads import head_map
from etbench.mech.interventions import replace, run
from etbench.models import toy
from etbench.models.kept_ablation import (
    KEPT_ABLATION_FILE,
    KeptAblation,
    fold_kept_ablation,
    load_kept_ablation,
    save_kept_ablation,
)

N_LAYERS, N_HEADS, D_MODEL = 2, 4, 64
D_HEAD = D_MODEL // N_HEADS


@pytest.fixture(scope="module")
def tok():
    return toy.word_level_tokenizer()


def _ablation(seed: int = 0) -> KeptAblation:
    gen = torch.Generator().manual_seed(seed)
    removed = {0: ((1, 3), torch.randn(2, D_HEAD, generator=gen)), 1: ((0,), torch.randn(1, D_HEAD, generator=gen))}
    return KeptAblation(N_LAYERS, N_HEADS, D_HEAD, removed)


def _inputs(tok):
    ids = tok("The apple is in Box F, the key is in Box Q. Box Q contains the", return_tensors="pt").input_ids
    return {"input_ids": torch.cat([ids, ids.flip(-1)])}


def test_fold_equals_replacing_z_by_the_mean_and_removed_heads_carry_nothing(tok):
    model = toy.tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL)
    folded = copy.deepcopy(model)
    ablation = _ablation()
    fold_kept_ablation(folded, ablation)
    inputs = _inputs(tok)
    seq = inputs["input_ids"].shape[1]
    hm = head_map(model)
    edits = [replace(layer, "z", mean_z, heads=list(heads))  # [k, d] broadcasts over batch and positions
             for layer, (heads, mean_z) in ablation.removed.items()]
    with torch.no_grad():
        expected = run(model, hm, inputs, edits).logits
        got = folded(**inputs).logits
        plain = model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the ablation does something on this model
    # patching a removed head's z in the folded model changes nothing; patching a kept head does
    fhm = head_map(folded)
    noise = torch.randn(2, seq, 1, D_HEAD) * 5
    with torch.no_grad():
        removed_patch = run(folded, fhm, inputs, [replace(0, "z", noise, heads=[1])]).logits
        kept_patch = run(folded, fhm, inputs, [replace(0, "z", noise, heads=[2])]).logits
    assert torch.equal(removed_patch, got)
    assert not torch.allclose(kept_patch, got, atol=1e-3)
    assert ablation.kept_heads() == {(0, 0), (0, 2), (1, 1), (1, 2), (1, 3)}


def test_file_round_trip_and_malformed_file(tmp_path):
    ablation = _ablation(1)
    path = tmp_path / KEPT_ABLATION_FILE
    save_kept_ablation(ablation, path)
    back = load_kept_ablation(path)
    assert back.removed_heads() == ablation.removed_heads()
    for layer, (heads, mean_z) in ablation.removed.items():
        assert back.removed[layer][0] == heads and torch.equal(back.removed[layer][1], mean_z)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(EtbenchError, match="not a kept-ablation file"):
        load_kept_ablation(bad)


def test_adapter_directory_with_a_kept_ablation_loads_folded(tmp_path, tok):
    from peft import LoraConfig, get_peft_model

    base = toy.tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    for name, targets in (("planted", ["q_proj", "v_proj"]), ("leaky", ["q_proj", "o_proj"])):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False,
                                                                    target_modules=targets))
        peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
        peft_model.save_pretrained(tmp_path / name)
        save_kept_ablation(_ablation(), tmp_path / name / KEPT_ABLATION_FILE)
    loaded = models.load(str(tmp_path / "planted"))
    expected = copy.deepcopy(base)
    fold_kept_ablation(expected, _ablation())
    expected = get_peft_model(expected, LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    expected.load_adapter(str(tmp_path / "planted"), adapter_name="default")
    inputs = _inputs(tok)
    with torch.no_grad():
        assert torch.allclose(loaded.model(**inputs).logits, expected(**inputs).logits, atol=1e-5)
    assert not models.shares_base(str(tmp_path / "base"), str(tmp_path / "planted"))
    with pytest.raises(EtbenchError, match="must not target o_proj"):
        models.load(str(tmp_path / "leaky"))
