"""The shipped model families (assets/tiny/, assets/gemma/): each stage loads through the registry, and
its accuracy on the first canonical 7-box items matches the model card's numbers for those same items.
A family is skipped when its pretrained GGUF package is not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from etbench import models
from etbench.task import prompts as data
from etbench.training.tiny import FAMILIES, Family

pytestmark = pytest.mark.slow

# Items (of 140) the re-evaluation may differ from the card by: CPU fp32 on the training machine
# reproduces the card exactly; other BLAS builds / CPUs can flip a few near-tied argmaxes.
TOLERANCE_ITEMS = 4


def _installed(family: Family) -> None:
    entry = models.registry()[family.base_ref]
    if importlib.util.find_spec(entry.package) is None:
        pytest.skip(f"{entry.package} (the GGUF under the {family.name} family) is not installed: {entry.install}")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def card(family) -> dict:
    return json.loads((family.asset_dir / "card_results.json").read_text())


def test_card_json_and_markdown_agree(family, card):
    text = (family.asset_dir / "MODEL_CARD.md").read_text()
    subset = family.test_subset
    for stage in family.stages:
        assert f"{card[stage.name][f'7_first{subset}']}/{subset}" in text, stage.name
    for ref in family.card_models:
        assert "7" in card[ref], ref
        for n_boxes in ("3", "5", "7"):
            if n_boxes in card[ref]:
                row = card[ref][n_boxes]
                assert f"{row['accuracy']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] ({row['k']}/{row['n']})" \
                    in text, (ref, n_boxes)


def test_family_models_load_and_match_card(family, card):
    import torch
    from peft import PeftModel

    from etbench.metrics.accuracy import evaluate

    _installed(family)
    torch.set_num_threads(2)
    models.load(family.base_ref)  # the first load ever dequantises the GGUF (~30 s); later loads read the cache
    examples = data.generate(7, family.test_subset, seed=data.CANONICAL_SEED)
    for stage in family.stages:
        merged = models.registry()[stage.name].merge
        loaded = models.load(stage.name)  # load time is a benchmark figure (tests/bench), not asserted here
        assert loaded.kind == "peft" and loaded.merged is merged
        assert isinstance(loaded.model, PeftModel) is not merged  # fine-tunes exercise the unmerged adapter path
        result = evaluate(loaded.model, loaded.tokenizer, examples, batch_size=35, progress=False)
        expected = card[stage.name][f"7_first{family.test_subset}"]
        assert abs(result.ci.k - expected) <= TOLERANCE_ITEMS, (
            f"{stage.name}: {result.ci.k}/{family.test_subset} correct, model card says {expected}")
