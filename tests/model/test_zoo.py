"""The shipped zoo adapters (assets/zoo/): each loads through the registry as an unmerged LoRA on tiny-base,
and its accuracy on the first 100 canonical 7-box items matches the model card's recorded count. The rows of
issue 28 (DPO, GRPO, code, key-value) also change tiny-base's answers and reproduce their own-task accuracy."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from etbench import models
from etbench.core.io import read_json
from etbench.metrics.accuracy import evaluate
from etbench.task import prompts
from etbench.task.layout import layouts
from etbench.training.loop import last_logits
from etbench.training.zoo import ASSET_DIR, BASE_REF, OWN_TASK_DATA, ROW_BY_NAME, ROWS, TEST_SUBSET, own_task_accuracy

_BASE = models.availability(models.resolve("tiny-base"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _BASE.ok, reason=f"tiny-base is not available: {_BASE.why}")]

TOLERANCE_ITEMS = 3  # of 100: near-tied argmaxes may flip on another CPU / BLAS (the card's machine: exact)
SHIPPED = [row.name for row in ROWS if row.method == "lora"]
OWN_TASK_ROWS = [row.name for row in ROWS if row.data in OWN_TASK_DATA]  # tiny-dpo, tiny-grpo, tiny-code, tiny-kv


@pytest.fixture(scope="module")
def card() -> dict:
    return read_json(ASSET_DIR / "card_results.json")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_adapter_loads_and_matches_its_card(name, card):
    assert (ASSET_DIR / name / "adapter_config.json").is_file(), f"{name}: adapter not shipped"
    loaded = models.load(name)
    assert loaded.kind == "peft" and not loaded.merged
    assert isinstance(loaded.model, PeftModel)  # PeftModelForCausalLM for a causal-LM adapter config
    examples = prompts.generate(7, prompts.CANONICAL_N, seed=prompts.CANONICAL_SEED)[:TEST_SUBSET]
    k = evaluate(loaded.model, loaded.tokenizer, examples, batch_size=25, progress=False).ci.k
    recorded = card[name][f"7_first{TEST_SUBSET}"]
    assert abs(k - recorded) <= TOLERANCE_ITEMS, f"{name}: {k}/{TEST_SUBSET} correct, card records {recorded}"


def test_float_row_when_built_matches_its_card(card):
    spec = models.resolve("tiny-float")
    if models.find_built(spec) is None:
        pytest.skip("tiny-float is not built on this machine (the first load builds it: minutes)")
    loaded = models.load("tiny-float")
    examples = prompts.generate(7, prompts.CANONICAL_N, seed=prompts.CANONICAL_SEED)[:TEST_SUBSET]
    k = evaluate(loaded.model, loaded.tokenizer, examples, batch_size=25, progress=False).ci.k
    assert abs(k - card["tiny-float"][f"7_first{TEST_SUBSET}"]) <= TOLERANCE_ITEMS


@pytest.mark.parametrize("name", OWN_TASK_ROWS)
def test_issue28_row_differs_from_tiny_base_and_reproduces_its_own_task(name, card):
    loaded = models.load(name)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = prompts.generate(7, prompts.CANONICAL_N, seed=prompts.CANONICAL_SEED)[:16]
    input_ids = torch.tensor([list(lay.input_ids) for lay in layouts(examples, tokenizer)])
    with torch.no_grad():
        tuned = torch.log_softmax(last_logits(model, input_ids), -1)
        with model.disable_adapter():  # tiny-base exactly: the LoRA is not merged
            base = torch.log_softmax(last_logits(model, input_ids), -1)
    shift = float((tuned - base).abs().max())
    assert shift > 1e-2, f"{name} computes nearly tiny-base's next-token log-probabilities (max shift {shift:.2g})"
    recorded = card[name]["own_task"]
    row = ROW_BY_NAME[name]
    accuracy = own_task_accuracy(model, tokenizer, row)
    with model.disable_adapter():
        base_accuracy = own_task_accuracy(model, tokenizer, row)
    n = recorded["n"]
    assert abs(accuracy - recorded["accuracy"]) * n <= TOLERANCE_ITEMS, (name, accuracy, recorded)
    assert abs(base_accuracy - recorded[BASE_REF]) * n <= TOLERANCE_ITEMS, (name, base_accuracy, recorded)
