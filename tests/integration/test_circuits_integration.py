"""Circuits on a real model: discovery (fast, tiny settings) and the paper's Table-1 experiment (a base
model's circuit evaluated on its fine-tuned version), on the embedded tiny pair when it is registered,
else on SmolLM2-135M-Instruct alone. Skipped when neither model is available offline."""

from __future__ import annotations

import pytest
import torch

from etbench import models
from etbench.metrics.discovery import discover
from etbench.metrics.faithfulness import evaluate_circuit, format_evaluation
from etbench.schema.circuit import GROUPS, Circuit

pytestmark = pytest.mark.slow
torch.set_num_threads(min(2, torch.get_num_threads()))


def _available(ref: str) -> bool:
    try:
        return models.availability(models.resolve(ref)).ok
    except Exception:  # an unknown alias
        return False


BASE = "tiny-base" if _available("tiny-base") else "smollm2-135m-instruct"
FT = "tiny-ft" if _available("tiny-ft") else None


@pytest.fixture(scope="module")
def base():
    if not _available(BASE):
        pytest.skip(f"{BASE} is not available offline")
    return models.load(BASE)


@pytest.fixture(scope="module")
def found(base):
    return discover(base, "fast", n=8, batch_size=8, candidate_k=4, receiver_k=2, verify_k=5,
                    minimality_mode="none", model_name=BASE)


def test_fast_discovery_on_a_real_model(found, tmp_path):
    c = found.circuit
    assert (c.n_layers, c.n_heads) == (30, 9) and c.model == BASE
    assert all(n.score < 0 for n in c.nodes())
    for g in GROUPS:  # verified heads carry exact scores and lead the ranking
        s = found.searches[g]
        verified = [tuple(h) for h in s.ranking if s.exact[h[0]][h[1]]]
        assert len(verified) == 5 and [tuple(h) for h in s.ranking[:5]] == verified
    assert Circuit.load(c.save(tmp_path / "c.json")) == c


def test_base_circuit_on_the_fine_tuned_model(found, base):
    target = models.load(FT) if FT else base
    ev = evaluate_circuit(target, found.circuit, n=16, mean_n=16, batch_size=8, random_draws=2,
                          completeness_draws=1, model_name=FT or BASE)
    assert ev.model_acc.n == 16 and 0 <= ev.circuit_acc.value <= 1
    assert len(ev.baseline.accuracies) == 2
    assert "faithfulness" in format_evaluation(ev)
