"""The training pieces the zoo adds, on a random toy Llama: the masked language-model loss is the plain
cross-entropy of the marked tokens, and training with heads knocked out (``knockout_edits`` under
``interventions.applied``) replaces exactly those heads' z at every position while gradients reach the LoRA."""

from __future__ import annotations

import pytest
import torch

from etbench.mech.heads import head_map
from etbench.mech.interventions import Site, applied, cache
from etbench.metrics.ablation import knockout_edits, mean_activations
from etbench.models import toy
from etbench.training.loop import add_lora, masked_token_loss, save_adapter


@pytest.fixture(scope="module")
def toy_model():
    tokenizer = toy.word_level_tokenizer()
    model = toy.tiny_llama(len(tokenizer), seed=0, n_layers=2, n_heads=4)
    return model.eval(), tokenizer


def test_masked_token_loss_is_cross_entropy_of_the_marked_tokens(toy_model):
    model, _ = toy_model
    rows = [([5, 6, 7, 8, 9], [False, False, True, True, False]), ([4, 3, 2], [False, True, True])]
    loss = masked_token_loss(model, rows, pad_id=0)
    scores, targets = [], []
    for ids, mask in rows:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        for t in range(1, len(ids)):
            if mask[t]:
                scores.append(logits[t - 1])
                targets.append(ids[t])
    expected = torch.nn.functional.cross_entropy(torch.stack(scores), torch.tensor(targets))
    assert torch.allclose(loss, expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="first token"):
        masked_token_loss(model, [([1, 2], [True, True])], pad_id=0)


def test_knockout_replaces_those_heads_everywhere_and_lets_gradients_through(toy_model):
    model, tokenizer = toy_model
    hm = head_map(model)
    mean = mean_activations(model, tokenizer, hm, n_boxes=3, n=8, seed=0)
    peft_model = add_lora(model, seed=0)
    lora_hm = head_map(peft_model)
    heads = [(1, 0), (1, 2)]
    length = mean.length
    edits = knockout_edits(mean, heads, length)
    ids = torch.randint(5, 30, (2, length))
    with applied(lora_hm, edits):
        seen = cache(peft_model, lora_hm, {"input_ids": ids}, [Site(1)])[(1, "z")]
        loss = peft_model(input_ids=ids).logits[:, -1].logsumexp(-1).mean()
    assert torch.allclose(seen[:, :, [0, 2]], mean.z[1][:length, [0, 2]].expand(2, -1, -1, -1))
    clean = cache(peft_model, lora_hm, {"input_ids": ids}, [Site(1)])[(1, "z")]
    assert torch.allclose(seen[:, :, [1, 3]], clean[:, :, [1, 3]])  # other heads untouched
    loss.backward()
    grads = [p.grad for name, p in peft_model.named_parameters() if "lora_" in name]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    peft_model.unload()


def test_fp16_adapter_saves_only_the_lora_and_reloads(toy_model, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model, _ = toy_model
    peft_model = add_lora(model, seed=1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero; give the adapter an effect to compare
    save_adapter(peft_model, tmp_path / "a", "toy-base", dtype=torch.float16)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float16 and "lora_" in k and ".default" not in k for k, t in saved.items())
    ids = torch.randint(5, 30, (1, 6))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    base = peft_model.unload()
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "a")).float()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-2)  # fp16 rounding of the adapter only
    reloaded.unload()
