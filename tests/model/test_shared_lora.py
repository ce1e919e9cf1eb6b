"""A LoRA fine-tune and its base on one copy of the base weights (adapter on for ft, off for base)
give per item exactly what two separately loaded copies give."""

import copy

import pytest
import torch

from etbench import models
from etbench.metrics import cmap
from etbench.metrics.accuracy import evaluate
from etbench.models import toy
from etbench.models.adapter import load_pair
from etbench.task import prompts as data

HEADS = {"A": [(1, 0), (1, 2)], "B": [(0, 1)], "C": [(0, 0)], "D": [(0, 3)]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora_pair")
    tok = toy.word_level_tokenizer()
    base = toy.tiny_llama(len(tok), n_layers=2, n_heads=4, seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                                target_modules=["q_proj", "v_proj", "o_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    peft_model.save_pretrained(root / "ft")
    return str(root / "base"), str(root / "ft")


def test_shared_copy_equals_two_copies_per_item(pair):
    base_ref, ft_ref = pair
    assert models.shares_base(base_ref, ft_ref) and not models.shares_base(ft_ref, base_ref)
    shared_base, shared_ft = load_pair(base_ref, ft_ref)
    copy_base, copy_ft = models.load(base_ref), models.load(ft_ref)
    assert shared_base.model.peft is shared_ft.model  # one copy of the weights
    stored = {p.data_ptr() for m in (shared_base.model, shared_ft.model) for p in m.parameters()}
    assert len(stored) == len(list(shared_ft.model.parameters()))

    examples = data.generate(7, 24, seed=5)
    tok = copy_base.tokenizer
    acc = {}
    for name, m in (("shared_base", shared_base), ("shared_ft", shared_ft), ("copy_base", copy_base),
                    ("copy_ft", copy_ft)):
        acc[name] = [(i.predicted_id, i.target_logprob) for i in evaluate(m.model, tok, examples, progress=False).items]
    assert acc["shared_ft"] == acc["copy_ft"]  # bitwise
    # The base through the switched-off adapter: the same predictions, and log-probabilities equal to
    # ~1 ulp. Measured: bitwise equal with full logits, but with logits_to_keep=1 the logits differ by
    # up to 1.2e-7 from a plain copy's (peft's forward path; the cause was not pinned down).
    assert [p for p, _ in acc["shared_base"]] == [p for p, _ in acc["copy_base"]]
    assert [lp for _, lp in acc["shared_base"]] == pytest.approx([lp for _, lp in acc["copy_base"]], abs=1e-6, rel=0)
    assert acc["copy_ft"] != acc["copy_base"]  # the adapter changes the model

    shared = cmap.run_cmap(shared_base.model, shared_ft.model, tok, HEADS, examples, variants=("output", "qkv"))
    copies = cmap.run_cmap(copy_base.model, copy_ft.model, tok, HEADS, examples, variants=("output", "qkv"))
    assert shared.base_predicted == copies.base_predicted and shared.ft_predicted == copies.ft_predicted
    assert [(r.variant, r.group, r.predicted) for r in shared.runs] == [(r.variant, r.group, r.predicted)
                                                                       for r in copies.runs]
