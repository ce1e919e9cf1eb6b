"""The shipped zoo adapters (assets/zoo/): each loads through the registry as an unmerged LoRA on tiny-base,
and its accuracy on the first 100 canonical 7-box items matches the model card's recorded count."""

from __future__ import annotations

import pytest
from peft import PeftModel

from etbench import models
from etbench.core.io import read_json
from etbench.metrics.accuracy import evaluate
from etbench.task import prompts
from etbench.training.zoo import ASSET_DIR, ROWS, TEST_SUBSET

_BASE = models.availability(models.resolve("tiny-base"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _BASE.ok, reason=f"tiny-base is not available: {_BASE.why}")]

TOLERANCE_ITEMS = 3  # of 100: near-tied argmaxes may flip on another CPU / BLAS (the card's machine: exact)
SHIPPED = [row.name for row in ROWS if row.method == "lora"]


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
