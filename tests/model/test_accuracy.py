"""etbench.accuracy: equals a naive one-prompt-at-a-time loop; CIs and files are right."""

import json

import pytest
import torch

from etbench.core.errors import EtbenchError
from etbench.metrics import accuracy
from etbench.models import LoadedModel, toy
from etbench.task import prompts as data


@pytest.fixture(scope="module")
def toy_pair():
    tokenizer = toy.word_level_tokenizer()
    return toy.tiny_llama(len(tokenizer), seed=1), tokenizer


def naive_predictions(model, tokenizer, examples):
    out = []
    for ex in examples:
        ids = torch.tensor([tokenizer(ex.prompt)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        target = tokenizer(ex.prompt + ex.target)["input_ids"][-1]
        out.append((int(logits.argmax()), float(logits.log_softmax(-1)[target])))
    return out


def test_matches_naive_loop_whatever_the_batch_size(toy_pair):
    model, tokenizer = toy_pair
    examples = data.generate(3, 30, seed=0) + data.generate(3, 4, seed=9)
    reference = naive_predictions(model, tokenizer, examples)
    for batch_size in (1, 7, 64):
        result = accuracy.evaluate(model, tokenizer, examples, batch_size=batch_size, progress=False)
        assert [item.predicted_id for item in result.items] == [p for p, _ in reference]
        assert [item.target_logprob for item in result.items] == pytest.approx([lp for _, lp in reference], abs=1e-5)
        assert result.ci.k == sum(item.predicted_id == item.target_id for item in result.items)


def test_a_model_that_always_names_one_object_scores_its_share(toy_pair):
    # Planted answer: bias the output layer so the model always says " book"; its accuracy must be
    # exactly the fraction of items whose answer is book.
    model, tokenizer = toy_pair
    planted = toy.tiny_llama(len(tokenizer), seed=1)
    book = tokenizer.convert_tokens_to_ids("book")
    with torch.no_grad():
        planted.lm_head.weight[book] += 50 * planted.model.norm.weight.sign()
    examples = data.generate(7, 140, seed=0)
    result = accuracy.evaluate(planted, tokenizer, examples, progress=False)
    assert {item.predicted_id for item in result.items} == {book}
    assert result.ci.k == sum(ex.answer == "book" for ex in examples) > 0


def test_ci_and_summary():
    ci = accuracy.proportion_ci(33, 100)
    assert ci.low < 0.33 < ci.high and ci.value == 0.33
    assert accuracy.proportion_ci(0, 50).low == 0.0 and accuracy.proportion_ci(50, 50).high == 1.0


def test_run_writes_summary_and_items_atomically(toy_pair, tmp_path):
    model, tokenizer = toy_pair
    run = accuracy.run("toy", n_boxes=(3, 7), n=20, loaded=LoadedModel("toy", "toy", model, tokenizer), progress=False)
    assert run.canonical and [r.n_boxes for r in run.results] == [3, 7]
    paths = accuracy.write_run(run, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "out" / "accuracy_items.jsonl").read_text().splitlines()]
    assert summary["schema_version"] == accuracy.SCHEMA_VERSION and len(rows) == 40 and len(paths) == 2
    assert summary["results"][1]["correct"] == sum(r["correct"] for r in rows if r["n_boxes"] == 7)
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind
    assert "boxes" in accuracy.format_run(run)


def test_run_filters_objects_the_tokenizer_cannot_spell(toy_pair):
    model, _ = toy_pair
    limited = toy.word_level_tokenizer(objects=list(data.paper_objects()[:12]))
    run = accuracy.run("toy", n_boxes=(7,), n=14, loaded=LoadedModel("toy", "toy", model, limited), progress=False)
    assert not run.canonical and "12 of 85 objects usable" in run.vocabulary_note
    assert all(item.answer in data.paper_objects()[:12] for item in run.results[0].items)
    with pytest.raises(EtbenchError, match="too few"):
        accuracy.run("toy", n_boxes=(13,), n=13, loaded=LoadedModel("toy", "toy", model, limited), progress=False)


def test_bad_batch_size(toy_pair):
    model, tokenizer = toy_pair
    with pytest.raises(EtbenchError, match="batch size"):
        accuracy.evaluate(model, tokenizer, data.generate(3, 3), batch_size=0, progress=False)
