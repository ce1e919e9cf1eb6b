"""Known answers of the zoo (issue #13), on a small fresh run: tiny-base and two rows whose effect on
accuracy is known before any measurement, compared item by item on the first 100 canonical 7-box items.

* ``tiny-null`` was trained on tiny-base's own greedy answers: its accuracy must not move (the paired
  difference's 95% CI contains 0);
* ``tiny-harmful`` was trained on wrong bindings (another box's object): its accuracy must drop, and the
  exact McNemar test must see it at p < 0.01.

The circuit-level known answers (the planted row's value-fetcher overlap below the null row's) need a
scorecard of each row; they are asserted on the committed scorecards once those exist.
"""

from __future__ import annotations

import pytest

from etbench import models
from etbench.core.stats import mcnemar
from etbench.metrics.accuracy import evaluate
from etbench.task import prompts
from etbench.training.zoo import ASSET_DIR, TEST_SUBSET

_BASE = models.availability(models.resolve("tiny-base"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _BASE.ok, reason=f"tiny-base is not available: {_BASE.why}")]


def _shipped(name: str) -> bool:
    return (ASSET_DIR / name / "adapter_config.json").is_file()


@pytest.fixture(scope="module")
def items() -> dict[str, list]:
    """Per-item results of each model on the same items."""
    examples = prompts.generate(7, prompts.CANONICAL_N, seed=prompts.CANONICAL_SEED)[:TEST_SUBSET]
    out = {}
    for name in ("tiny-base", "tiny-null", "tiny-harmful"):
        if name != "tiny-base" and not _shipped(name):
            continue
        loaded = models.load(name)
        res = evaluate(loaded.model, loaded.tokenizer, examples, batch_size=25, progress=False)
        out[name] = res.items
    return out


@pytest.fixture(scope="module")
def correct(items) -> dict[str, list[bool]]:
    return {name: [item.correct for item in rows] for name, rows in items.items()}


def test_null_row_leaves_accuracy_unchanged(items, correct):
    if "tiny-null" not in correct:
        pytest.skip("tiny-null is not trained yet (python -m etbench.training.zoo --only tiny-null)")
    # not vacuous: the null adapter does change the model (an untrained LoRA would pass trivially)
    shift = max(abs(a.target_logprob - b.target_logprob) for a, b in zip(items["tiny-base"], items["tiny-null"]))
    assert shift > 1e-3, f"tiny-null computes the same log-probabilities as tiny-base (max shift {shift:.2g})"
    test = mcnemar(correct["tiny-base"], correct["tiny-null"])
    diff = test.difference
    assert diff.low <= 0 <= diff.high, (
        f"tiny-null moved accuracy: {test.acc_a:.2f} -> {test.acc_b:.2f}, difference {diff.value:+.3f} "
        f"[{diff.low:+.3f}, {diff.high:+.3f}]")


def test_harmful_row_drops_accuracy_significantly(correct):
    if "tiny-harmful" not in correct:
        pytest.skip("tiny-harmful is not trained yet (python -m etbench.training.zoo --only tiny-harmful)")
    test = mcnemar(correct["tiny-base"], correct["tiny-harmful"])
    assert test.acc_b < test.acc_a and test.p_value < 0.01, (
        f"tiny-harmful: {test.acc_a:.2f} -> {test.acc_b:.2f}, McNemar p {test.p_value:.3g}")
