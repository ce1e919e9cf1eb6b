"""etbench.data: the paper's template exactly, seeded determinism, the block layout."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from etbench.core.errors import EtbenchError
from etbench.task import prompts as data

FIXTURES = Path(__file__).parent.parent / "fixtures"
SEGMENT = r"the (\w+) is in Box ([A-Z])"


def parse_prompt(prompt: str):
    """Objects, labels and query label of a paper-style prompt (independent of etbench.render)."""
    context, query = prompt.split(". Box ")
    pairs = re.findall(SEGMENT, context[0].lower() + context[1:])
    return tuple(o for o, _ in pairs), tuple(lab for _, lab in pairs), query.split(" ")[0]


def test_reconstructed_first_sample_of_the_paper_dataset_is_reproduced_byte_for_byte():
    rows = [json.loads(line) for line in (FIXTURES / "reconstructed_dataset_jsonl_first_sample.jsonl").open()]
    objects, labels, _ = parse_prompt(rows[0]["sentence"].rsplit(" ", 1)[0])
    context = data.Example(objects=objects, labels=labels, query_index=0)
    for q, row in enumerate(rows):
        assert context.with_query(q).to_paper_record(sample_id=0) == row


def test_prompts_recovered_from_the_paper_notebooks_render_identically():
    rows = [json.loads(line) for line in (FIXTURES / "recovered_7box_prompts_from_notebooks.jsonl").open()]
    assert len(rows) == 94
    for row in rows:
        objects, labels, query_label = parse_prompt(row["prompt"])
        q = labels.index(query_label) if query_label in labels else 0
        ex = data.Example(objects=objects, labels=labels, query_index=q, query_label=query_label)
        assert ex.prompt == row["prompt"]
        if row["answer"] is not None:
            assert ex.answer == row["answer"] and q == row["query_position"]


def test_template_and_answer():
    ex = data.generate(n_boxes=7, n=7, seed=0)[2]
    objects, labels, query_label = parse_prompt(ex.prompt)
    context = ", ".join(f"the {o} is in Box {lab}" for o, lab in zip(objects, labels))
    assert ex.prompt == "T" + context[1:] + f". Box {query_label} contains the"
    assert ex.target == " " + ex.answer and ex.answer == objects[labels.index(query_label)]
    assert ex.sentence == ex.prompt + f" {ex.answer}."


def test_golden_first_example_guards_cross_machine_stability():
    # If this changes, every published number changes with it: bump the task version instead.
    ex = data.generate(n_boxes=7, n=1, seed=0)[0]
    assert ex.prompt == ("The meat is in Box G, the key is in Box W, the clock is in Box Q, the newspaper is in "
                         "Box V, the gift is in Box Y, the sheet is in Box I, the rock is in Box A. Box G contains the")


@pytest.mark.parametrize("n_boxes", [2, 3, 7, 26])
def test_distinct_objects_and_labels_and_block_layout(n_boxes):
    examples = data.generate(n_boxes=n_boxes, n=10 * n_boxes, seed=3)
    assert len(examples) == 10 * n_boxes
    for k, ex in enumerate(examples):
        assert len(set(ex.objects)) == n_boxes and len(set(ex.labels)) == n_boxes
        assert set(ex.objects) <= set(data.paper_objects()) and set(ex.labels) <= set(data.LABELS)
        block = examples[k - k % n_boxes]
        assert ex.query_index == k % n_boxes and ex.objects == block.objects and ex.labels == block.labels
        assert ex.context_id == k // n_boxes


def test_partial_last_block():
    examples = data.generate(n_boxes=7, n=500, seed=0)
    assert len(examples) == 500 and examples[-1].query_index == 500 % 7 - 1 and examples[-1].context_id == 71


def test_seeded_determinism_and_seed_sensitivity():
    assert data.generate(7, 70, seed=5) == data.generate(7, 70, seed=5)
    assert data.generate(7, 70, seed=5) != data.generate(7, 70, seed=6)
    # n is a prefix of the same stream: asking for more examples never changes the first ones.
    assert data.generate(7, 700, seed=5)[:70] == data.generate(7, 70, seed=5)


def test_sampling_covers_all_labels_and_objects_uniformly_enough():
    examples = data.generate(7, 7 * 2000, seed=1)[::7]
    labels = Counter(lab for ex in examples for lab in ex.labels)
    objects = Counter(o for ex in examples for o in ex.objects)
    assert set(labels) == set(data.LABELS) and len(objects) == 85
    expected = 2000 * 7 / 26
    assert all(abs(c - expected) < 0.15 * expected for c in labels.values())


@pytest.mark.parametrize("n_boxes", [0, 1, 27])
def test_bad_box_counts_are_clear_errors(n_boxes):
    with pytest.raises(EtbenchError, match="between 2 and 26"):
        data.generate(n_boxes=n_boxes, n=5)


def test_too_few_objects_is_a_clear_error():
    with pytest.raises(EtbenchError, match="distinct objects"):
        data.generate(n_boxes=7, n=5, objects=("book", "car"))


def test_paper_objects_and_dataset_view():
    assert len(data.paper_objects()) == 85 and data.paper_objects()[:3] == ("book", "car", "paper")
    ds = data.to_dataset(data.generate(5, 10, seed=0))
    assert ds.num_rows == 10 and {"prompt", "target", "choices", "label"} <= set(ds.column_names)
    assert ds[3]["choices"][ds[3]["label"]] == ds[3]["answer"]


def test_alterations_reword_only_the_source():
    ex = data.Example(objects=("book", "car", "key"), labels=("A", "B", "C"), query_index=1)
    assert data.Example(**{**ex.__dict__, "alteration": "altered_box_obj_order"}).prompt == (
        "The book is in Box A, Box B contains the car, the key is in Box C. Box B contains the")
    assert data.Example(**{**ex.__dict__, "alteration": "no_comma"}).prompt == (
        "The book is in Box A the car is in Box B the key is in Box C. Box B contains the")
    assert data.Example(**{**ex.__dict__, "alteration": "add_seg_start"}).prompt.startswith(
        "The apple is in Box O, the book is in Box A")
    with pytest.raises(EtbenchError, match="unknown alteration"):
        data.Example(objects=("a", "b"), labels=("A", "B"), query_index=0, alteration="nope")
