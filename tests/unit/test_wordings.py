"""Wordings of the task: the same contexts and queries, other words; positions found in each."""

from __future__ import annotations

import pytest

from etbench.core.errors import EtbenchError
from etbench.models.toy import byte_level_bpe_tokenizer
from etbench.task import prompts
from etbench.task.layout import layouts


def test_every_wording_asks_the_same_queries():
    by = {w: prompts.generate(n_boxes=5, n=12, seed=3, wording=w) for w in prompts.WORDINGS}
    paper = by["paper"]
    assert paper == prompts.generate(n_boxes=5, n=12, seed=3)  # the default is the paper's template
    for w, examples in by.items():
        assert [(e.objects, e.labels, e.query_index, e.answer) for e in examples] == \
            [(e.objects, e.labels, e.query_index, e.answer) for e in paper]
        assert all(e.wording == w for e in examples)
        if w != "paper":
            assert all(a.prompt != b.prompt for a, b in zip(examples, paper))


@pytest.mark.parametrize("wording", list(prompts.WORDINGS))
def test_spans_name_the_objects_and_labels(wording):
    for ex in prompts.generate(n_boxes=4, n=8, seed=1, wording=wording):
        r = prompts.render(ex)
        assert [r.prompt[s.start:s.end] for s in r.object_spans] == list(ex.objects)
        assert [r.prompt[s.start:s.end] for s in r.label_spans] == list(ex.labels)
        assert r.prompt[r.query_label_span.start:r.query_label_span.end] == ex.query_label
        assert r.prompt[0].isupper() and r.prompt.endswith(prompts.WORDINGS[wording].after_query_label)


def test_held_out_wordings_differ_from_the_training_ones():
    """Neither held-out wording uses the crate wording's words (tiny-ft and gemma-ft trained on it)."""
    for w in ("stored", "bin"):
        text = prompts.generate(n_boxes=3, n=1, seed=0, wording=w)[0].prompt.lower()
        assert "crate" not in text and "holds" not in text and "sits inside" not in text
        assert " is in box " not in text  # nor the paper's segment (trained by tiny-base and every paper-template row)


@pytest.mark.parametrize("wording", list(prompts.WORDINGS))
def test_layout_finds_the_positions_in_every_wording(wording):
    tok = byte_level_bpe_tokenizer()
    examples = prompts.generate(n_boxes=3, n=6, seed=2, wording=wording)
    for ex, lay in zip(examples, layouts(examples, tok)):
        text = lambda pos: tok.decode([lay.input_ids[pos]]).strip()  # noqa: E731
        assert text(lay.position("query_label")) == ex.query_label
        assert text(lay.position("prev_query_label")) == ex.query_label
        assert lay.position("prev_query_label") < lay.position("query_label") < lay.position("last")
        assert lay.position("last") == lay.length - 1


def test_unknown_wording_and_reworded_alterations_are_refused():
    with pytest.raises(EtbenchError, match="unknown wording"):
        prompts.generate(n_boxes=3, n=1, wording="crate")
    ex = prompts.generate(n_boxes=3, n=1, wording="bin")[0]
    with pytest.raises(EtbenchError, match="alterations reword"):
        prompts.Example(ex.objects, ex.labels, 0, alteration="no_comma", wording="bin")
