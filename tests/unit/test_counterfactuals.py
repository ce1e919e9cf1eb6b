"""etbench.counterfactuals: each desideratum's target on hand-checked pairs, and its invariants."""

import pytest

from etbench.models import toy
from etbench.task import counterfactuals as cf
from etbench.task import prompts as data
from etbench.task.prompts import Example

BASE = Example(objects=("book", "car", "key", "cup", "map"), labels=("F", "Q", "A", "Z", "K"), query_index=1)


@pytest.fixture(scope="module")
def bpe():
    return toy.byte_level_bpe_tokenizer()


@pytest.fixture(scope="module")
def bases():
    return data.generate(n_boxes=7, n=140, seed=2)


def test_hand_checked_targets():
    # Base asks Box Q -> car. Take the pair each desideratum builds for it and check the target by hand.
    pos = cf.desideratum_pairs("positional", [BASE], seed=0)[0]
    s = pos.source.query_index
    assert s != 1 and pos.target_object == BASE.objects[s]  # the base object at the source's position
    obj = cf.desideratum_pairs("object_value", [BASE], seed=0)[0]
    assert obj.target_object == obj.source.objects[obj.source.query_index] == obj.source.answer
    assert obj.target_object not in ("car", BASE.objects[obj.source.query_index])
    box = cf.desideratum_pairs("box_label_value", [BASE], seed=0)[0]
    label = box.source.query_label
    assert label in BASE.labels and label != "Q"
    assert box.target_object == BASE.objects[BASE.labels.index(label)]  # the base object in that box
    assert box.source.query_index not in (1, BASE.labels.index(label))
    inc = cf.desideratum_pairs("incorrect_segment", [BASE], seed=0)[0]
    assert inc.target_object == BASE.objects[(inc.source.query_index + 1) % 5]


@pytest.mark.parametrize("kind", cf.DESIDERATA)
def test_invariants_of_every_desideratum(kind, bases):
    pairs = cf.desideratum_pairs(kind, bases, seed=1)
    assert len(pairs) == len(bases)
    for p in pairs:
        base, src = p.base, p.source
        assert p.kind == kind and src.n_boxes == base.n_boxes
        assert src.query_index != base.query_index  # B2 fixed: never the base's own segment
        assert len(set(src.objects)) == src.n_boxes and len(set(src.labels)) == src.n_boxes
        if kind != "incorrect_segment":
            assert p.target_object != base.answer  # a no-op patch can never score
        if kind in ("positional", *set(cf.ADDITIONAL_DESIDERATA) - {"incorrect_segment"}):
            assert p.target_object == base.objects[src.query_index]
        if kind in cf.ADDITIONAL_DESIDERATA and kind != "incorrect_segment":
            assert src.alteration == kind
        if kind in ("add_seg_start", "add_seg_end"):
            assert "apple" not in src.objects and "O" not in src.labels


def test_b2_fix_source_segments_cover_every_other_segment(bases):
    pairs = cf.desideratum_pairs("positional", bases, seed=0)
    seen = {(p.base.query_index, p.source.query_index) for p in pairs}
    assert all(b != s for b, s in seen)
    assert {s for _, s in seen} == set(range(7))  # segment 0 too (the reference never used it)


def test_noise_pairs_follow_the_reference_rule(bases):
    for p in cf.noise_pairs(bases, seed=0):
        assert p.source.query_index == (p.base.query_index + 1) % 7
        assert p.target_object == p.base.answer  # scored against the clean answer


def test_b1_fix_targets_are_leading_space_tokens(bases, bpe):
    encoded = cf.encode_pairs(cf.desideratum_pairs("box_label_value", bases[:20], seed=0), bpe)
    for e in encoded:
        assert bpe.convert_ids_to_tokens(e.target_id) == "Ġ" + e.pair.target_object
        assert e.source_layout.prev_query_label is not None  # the source's label is in its context


def test_encoded_altered_sources_keep_exact_positions(bases, bpe):
    for kind in cf.ADDITIONAL_DESIDERATA:
        for e in cf.encode_pairs(cf.desideratum_pairs(kind, bases[:14], seed=0), bpe):
            ids, lay, src = e.source_layout.input_ids, e.source_layout, e.pair.source
            assert bpe.decode([ids[lay.query_label]]).strip() == src.query_label
            assert [bpe.decode([ids[i]]).strip() for i in lay.object_positions] == list(src.objects)


def test_pairs_are_seeded(bases):
    assert cf.make_pairs("object_value", bases, seed=3) == cf.make_pairs("object_value", bases, seed=3)
    assert cf.make_pairs("object_value", bases, seed=3) != cf.make_pairs("object_value", bases, seed=4)


def test_unknown_desideratum_and_too_small_contexts_are_clear_errors():
    from etbench.core.errors import EtbenchError

    with pytest.raises(EtbenchError, match="unknown desideratum"):
        cf.make_pairs("nope", [BASE])
    with pytest.raises(EtbenchError, match="at least 3 boxes"):
        cf.make_pairs("box_label_value", data.generate(2, 2))


@pytest.mark.parametrize("kind", cf.MAIN_DESIDERATA)
def test_dataset_sources_are_other_examples_of_the_set(kind, bases):
    """A dataset source is another base example queried at the source segment (box_label_value: with the queried
    label put there), so it shares its partner's prompt up to the query; the targets keep their rules."""
    pairs = cf.desideratum_pairs(kind, bases, seed=1, sources="dataset")
    assert pairs == cf.desideratum_pairs(kind, bases, seed=1, sources="dataset")  # seeded
    rows = [p.source_row for p in pairs]
    assert all(r is not None and r != k for k, r in enumerate(rows))  # never the base's own row
    assert len(set(rows)) > len(bases) // 2  # drawn over the set, not one partner
    for p in pairs:
        base, src, partner = p.base, p.source, bases[p.source_row]
        assert src.query_index != base.query_index and p.target_object != base.answer
        assert src.objects == partner.objects and src.context_id == partner.context_id
        if kind == "box_label_value":
            assert src.query_label == src.labels[src.query_index] and src.query_label in base.labels
            assert p.target_object == base.objects[base.labels.index(src.query_label)]
            assert len(set(src.labels)) == src.n_boxes
            assert sum(a != b for a, b in zip(src.labels, partner.labels)) <= 2  # at most one swap
            assert src.query_index not in (base.query_index, base.labels.index(src.query_label))
        else:
            assert src.labels == partner.labels
        if kind == "positional":
            assert p.target_object == base.objects[src.query_index]
        if kind == "object_value":
            assert p.target_object == src.answer and src.answer not in (base.answer, base.objects[src.query_index])
    if kind == "box_label_value":  # with 140 examples nearly every base finds a partner holding its label
        assert sum(p.source.labels == bases[p.source_row].labels for p in pairs) >= 0.95 * len(pairs)
    # fresh contexts are untouched by the option: the same pairs as without it, no partner row
    fresh = cf.desideratum_pairs(kind, bases, seed=1)
    assert fresh == cf.desideratum_pairs(kind, bases, seed=1, sources="fresh") != pairs
    assert all(p.source_row is None for p in fresh)


def test_dataset_sources_errors(bases):
    from etbench.core.errors import EtbenchError

    with pytest.raises(EtbenchError, match="main desiderata"):
        cf.desideratum_pairs("add_seg_start", bases, sources="dataset")
    with pytest.raises(EtbenchError, match="at least 2 base examples"):
        cf.desideratum_pairs("positional", bases[:1], sources="dataset")
    with pytest.raises(EtbenchError, match="sources must be one of"):
        cf.desideratum_pairs("positional", bases, sources="other")
    # two examples whose objects make object_value impossible: the partner's answer is always a hypothesis's
    a = Example(objects=("book", "car", "key"), labels=("F", "Q", "A"), query_index=0)
    b = Example(objects=("car", "book", "key"), labels=("F", "Q", "A"), query_index=1)
    with pytest.raises(EtbenchError, match="too small for dataset sources"):
        cf.desideratum_pairs("object_value", [a, b], sources="dataset")
