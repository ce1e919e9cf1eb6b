"""accuracy_by_wording on a toy: the paper's row is the ordinary accuracy, the others are paired with it."""

from __future__ import annotations

import json

import torch

from etbench.metrics.accuracy import evaluate
from etbench.metrics.wordings import WordingAccuracy, accuracy_by_wording, format_wording_accuracy
from etbench.models.toy import byte_level_bpe_tokenizer, tiny_llama
from etbench.task import prompts

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_rows_are_accuracies_on_the_same_items():
    tok = byte_level_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    res = accuracy_by_wording(model, tok, n_boxes=3, n=30, seed=2, model_name="toy")
    assert [r.wording for r in res.rows] == list(prompts.WORDINGS) and res.reference == "paper"
    for row in res.rows:
        examples = prompts.generate(n_boxes=3, n=30, seed=2, wording=row.wording)
        direct = evaluate(model, tok, examples, progress=False)
        assert row.correct == [item.correct for item in direct.items] and row.accuracy.value == direct.accuracy
        if row.wording == "paper":
            assert row.vs_reference is None and row.mcnemar_p is None
        else:
            diff = sum(row.correct) / 30 - sum(res.rows[0].correct) / 30
            assert row.vs_reference.value == diff and 0 <= row.mcnemar_p <= 1
    assert WordingAccuracy.from_dict(json.loads(json.dumps(res.to_dict(), allow_nan=False))) == res
    assert "stored" in format_wording_accuracy(res)


def test_circuit_by_wording_is_the_circuit_evaluation_in_each_wording():
    from etbench.core.io import finite
    from etbench.metrics.faithfulness import evaluate_circuit
    from etbench.metrics.wordings import circuit_by_wording
    from etbench.schema.circuit import Circuit

    tok = byte_level_bpe_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    circuit = Circuit.from_heads({"value_fetcher": [(1, 0), (1, 2)], "position_transmitter": [(0, 1)],
                                  "position_detector": [(0, 3)], "structure_reader": [(0, 0)]}, n_layers=2, n_heads=4)
    kw = dict(n_boxes=3, n=30, seed=2, mean_n=20)
    rows = circuit_by_wording(model, circuit, tok, **kw)
    paper = evaluate_circuit(model, circuit, tok, random_draws=0, completeness_draws=0, curve=False, **kw)
    assert rows[0].wording == "paper" and rows[0].circuit_acc.value == paper.circuit_acc.value
    assert rows[0].faithfulness.value == finite(paper.faithfulness)  # None where the toy answers nothing
    by = accuracy_by_wording(model, tok, n_boxes=3, n=30, seed=2)
    for row in rows:  # the runner's unablated pass is the model's accuracy in that wording
        assert row.model_acc.value == by.row(row.wording).accuracy.value
