"""etbench.layout: positions point at the right tokens, for two different tokenizer families."""

import pytest
import torch

from etbench.core.errors import EtbenchError
from etbench.models import toy
from etbench.task import prompts as data
from etbench.task.layout import check_vocabulary, layouts, pad_batch, single_token_continuations
from etbench.task.prompts import Example


@pytest.fixture(scope="module", params=["word_level", "byte_level_bpe"])
def tokenizer(request):
    return toy.word_level_tokenizer() if request.param == "word_level" else toy.byte_level_bpe_tokenizer()


def token_text(tokenizer, token_id) -> str:
    return tokenizer.decode([token_id]).strip()


def test_every_position_points_at_its_word(tokenizer):
    examples = data.generate(n_boxes=7, n=21, seed=4) + data.generate(n_boxes=3, n=6, seed=4)
    for ex, lay in zip(examples, layouts(examples, tokenizer)):
        ids = lay.input_ids
        assert [token_text(tokenizer, ids[p]) for p in lay.object_positions] == list(ex.objects)
        assert [token_text(tokenizer, ids[p]) for p in lay.label_positions] == list(ex.labels)
        assert token_text(tokenizer, ids[lay.query_label]) == ex.query_label
        assert lay.prev_query_label == lay.label_positions[ex.query_index] < lay.query_label
        assert lay.last == lay.length - 1 and token_text(tokenizer, ids[lay.last]) == "the"
        assert lay.query_label == lay.last - 2  # "Box Q contains the"
        assert token_text(tokenizer, lay.target_id) == ex.answer
        assert list(ids) == tokenizer(ex.prompt)["input_ids"]


def test_word_level_layout_matches_the_papers_54_token_llama_layout():
    # With a BOS and one token per word the layout is the paper's (docs/method.md §1): objects at 2+7k,
    # labels at 6+7k, query label 51, last token 53.
    lay = layouts(data.generate(7, 1, seed=0), toy.word_level_tokenizer())[0]
    assert lay.length == 54 and lay.last == 53 and lay.query_label == 51
    assert lay.object_positions == tuple(2 + 7 * k for k in range(7))
    assert lay.label_positions == tuple(6 + 7 * k for k in range(7))


def test_the_two_tokenizers_really_spell_spaces_differently():
    bpe, word = toy.byte_level_bpe_tokenizer(), toy.word_level_tokenizer()
    assert bpe.convert_ids_to_tokens(bpe(" book", add_special_tokens=False)["input_ids"]) == ["Ġbook"]
    assert word.convert_ids_to_tokens(word(" book", add_special_tokens=False)["input_ids"]) == ["book"]
    assert word("x")["input_ids"][0] == word.bos_token_id and bpe("book")["input_ids"][0] != bpe.bos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_does_not_change_any_position(tokenizer, side):
    examples = data.generate(n_boxes=3, n=3, seed=0) + data.generate(n_boxes=7, n=3, seed=0)
    lays = layouts(examples, tokenizer)
    batch = pad_batch(lays, pad_id=0, padding_side=side)
    for cls in ("last", "query_label", "prev_query_label"):
        pos = batch.positions(lays, cls)
        for row, lay in enumerate(lays):
            assert batch.input_ids[row, pos[row]] == lay.input_ids[lay.position(cls)]
    # position ids restart at 0 at each row's first real token
    first = batch.attention_mask.argmax(-1)
    assert torch.all(batch.position_ids[torch.arange(len(lays)), first] == 0)


def test_noise_prompt_without_its_query_label_has_no_previous_position(tokenizer):
    ex = Example(objects=("book", "car", "key"), labels=("A", "B", "C"), query_index=1, query_label="Z")
    lay = layouts([ex], tokenizer)[0]
    assert lay.prev_query_label is None and lay.target_id is None
    with pytest.raises(EtbenchError, match="no prev_query_label"):
        lay.position("prev_query_label")


def test_multi_token_objects_are_filtered_with_a_report_and_rejected_in_layouts():
    limited = toy.word_level_tokenizer(objects=list(data.paper_objects()[:10]))
    report = check_vocabulary(limited)
    assert report.kept_objects == data.paper_objects()[:10] and len(report.dropped_objects) == 75
    assert "10 of 85 objects usable" in report.summary()
    report.require(7)
    with pytest.raises(EtbenchError, match="too few"):
        report.require(11)
    with pytest.raises(EtbenchError, match="not single tokens"):
        layouts([Example(objects=("book", "magnet"), labels=("A", "B"), query_index=0)], limited)
    assert check_vocabulary(toy.word_level_tokenizer()).dropped_objects == ()


def test_bpe_splits_an_unseen_word_and_the_check_notices(tokenizer):
    # "xylophone" was never in the BPE corpus, so it is several pieces there (one <unk> word-level).
    report = check_vocabulary(toy.byte_level_bpe_tokenizer(), objects=("book", "xylophone"))
    assert report.dropped_objects == ("xylophone",)
    with pytest.raises(EtbenchError, match="not one token"):
        single_token_continuations(toy.byte_level_bpe_tokenizer(), ["Box A contains the"], [" xylophone"])


def test_tokenizer_that_appends_special_tokens_is_rejected():
    from tokenizers import processors

    tok = toy.word_level_tokenizer()
    eos = tok.convert_tokens_to_ids("</s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    with pytest.raises(EtbenchError, match="after the text"):
        layouts(data.generate(3, 1), tok)


def test_layouts_are_found_once_per_tokenizer_and_again_after_a_token_is_added():
    """The memo returns, for prompts laid out before, the very layouts found then (in the order asked, repeats
    included), keeps tokenizers apart, and finds them anew once the tokenizer's vocabulary changes."""
    import etbench.task.layout as layout

    word, bpe = toy.word_level_tokenizer(), toy.byte_level_bpe_tokenizer()
    examples = data.generate(n_boxes=3, n=4, seed=9)
    first = layouts(examples, word)
    calls = []
    original = layout._layouts
    try:
        layout._layouts = lambda exs, tok: calls.append(len(exs)) or original(exs, tok)
        again = layouts([examples[2], examples[0], examples[2]], word)
        assert calls == [] and again == [first[2], first[0], first[2]] and again[0] is first[2]
        other = layouts(examples, bpe)
        assert calls == [4] and [lay.input_ids for lay in other] != [lay.input_ids for lay in first]
        word.add_tokens(["zzgadget"])
        assert layouts(examples, word) == first and calls == [4, 4]  # found again; the prompts' tokens unchanged
    finally:
        layout._layouts = original
