"""etbench.dcm: a planted answer is recovered, the fast paths equal the plain computation, seeding,
the semantics check and input validation. Tiny models only (seconds on 2 cores)."""


from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from etbench.core.errors import EtbenchError
from etbench.mech.heads import head_map
from etbench.mech.interventions import replace as replace_edit
from etbench.mech.interventions import run
from etbench.metrics import dcm
from etbench.models.toy import tiny_llama, word_level_tokenizer
from etbench.task.counterfactuals import EncodedPair

HEADS = {"A": [(1, 0), (1, 2)], "B": [(0, 1), (1, 3)], "C": [(0, 0), (0, 2)], "D": [(0, 3), (1, 1)]}


SMALL = dcm.DcmConfig(n_train=16, n_val=8, n_test=8, epochs=1, batch_size=8, eval_every=1, eval_batch_size=8,
                      semantics_n=8, semantics_repeats=2, additional_for=())


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    torch.manual_seed(0)
    return tiny_llama(len(tok), n_layers=2, n_heads=4, d_model=64, seed=0)


@pytest.fixture(scope="module")
def trained(tok, llama):
    """One seeded DCM run over all four groups x the three main desiderata (shared, read-only)."""
    return dcm.train_masks(llama, tok, HEADS, SMALL)


def _planted_gpt2(tok, p0: int, p1: int = 1):
    """A 1-layer GPT-2 whose last-token prediction is read off two heads.

    Token and position embeddings are one-hot (token t in dim t, position j in dim 300 + j), tied
    unembedding, MLP zeroed. Head 0 attends (from every position) to position ``p0`` and copies its
    token into the logits with weight 1; head 1 (a decoy that matters to the output but carries no
    information about the pair) does the same for position ``p1`` (the sentence-initial "The", the
    same in every prompt) with weight 0.5; heads 2 and 3 write nothing (zero W_O rows). So the model
    predicts the object at ``p0``, and only head 0's z carries it: patching head 0 alone from a
    source prompt makes the model predict the *source's* object at ``p0``.

    (A decoy copying a prompt-specific token would be selected too, and rightly under DCM's rules:
    a half-mixed z has a smaller norm, which raises every normalised logit through ln_f, and the
    paper's tie rule prefers the mask patching more heads at equal validation accuracy.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    V, D, H = len(tok), 640, 4
    dh = D // H
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=D, n_layer=1, n_head=H, n_inner=8,
                     bos_token_id=1, eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
        model.transformer.wte.weight[:, :V] = torch.eye(V)  # tied with lm_head
        model.transformer.wpe.weight[:, 300:364] = torch.eye(64)
        attn = model.transformer.h[0].attn
        w, b, wo = attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight  # Conv1D: y = x @ w + b
        for head, pos, gain in ((0, p0, 1.0), (1, p1, 0.5)):
            q0, k0, v0 = head * dh, D + head * dh, 2 * D + head * dh
            b[q0] = 20.0  # a constant query ...
            w[300 + pos, k0] = 1.0  # ... matching only the key of position `pos`
            for t in range(V):
                w[t, v0 + t] = 1.0  # value = the token at that position
                wo[head * dh + t, t] = gain  # written back onto the token's logit
    return model


def _first_object_pairs(tok, n: int, seed: int = 0) -> dcm.PairSet:
    """Pairs whose target is the source's first object (what the planted head carries)."""
    ex, pool, labels = dcm.dcm_examples(tok, n, 7, seed)
    ps = dcm.make_pair_sets(tok, ex, ["object_value"], seed, pool, labels)["object_value"]
    pairs = tuple(EncodedPair(p.pair, p.base_layout, p.source_layout,
                              tok.convert_tokens_to_ids(p.pair.source.objects[0])) for p in ps.pairs)
    return dcm.PairSet("first_object", pairs, torch.tensor([p.target_id for p in pairs]))


def test_dcm_recovers_planted_head(tok):
    ps = _first_object_pairs(tok, 64)
    lay = ps.pairs[0].base_layout
    model = _planted_gpt2(tok, lay.object_positions[0], lay.object_positions[0] - 1)
    assert tok.convert_ids_to_tokens(lay.input_ids[lay.object_positions[0] - 1]) == "The"
    # the construction works: the model names the first object of its prompt
    ids = torch.tensor([p.base_layout.input_ids for p in ps.pairs[:8]])
    pred = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    assert pred == [tok.convert_tokens_to_ids(p.pair.base.objects[0]) for p in ps.pairs[:8]]

    cfg = dcm.DcmConfig(n_train=32, n_val=16, n_test=16, epochs=2, batch_size=8, eval_every=2, eval_batch_size=16)
    heads = {"value_fetcher": [(0, 0), (0, 1), (0, 2), (0, 3)]}
    res = dcm.fit_masks(model, heads, {"first_object": ps}, cfg)
    (m,) = res.masks
    assert m.selected == ((0, 0),)
    assert m.test.value == 1.0 and m.val_accuracy == 1.0
    assert m.mask[0] <= 0.5 and all(x > 0.5 for x in m.mask[1:])
    score = m.score("planted")
    assert score.selected_heads == [[0, 0]] and score.test_accuracy.value == 1.0
    # with no heads patched the target is (almost) never the prediction
    assert m.history[0][1] >= 0 and any(h[1] == 1 for h in m.history)


def _replace_edits(heads, values, pos):
    """Edits that overwrite the heads' z with ``values`` ``[B, n, d]`` at ``pos`` ``[B]`` (an ``EditsFn``)."""
    layers = dcm.by_layer(heads)

    def make(sub, shift):
        p, vals = pos[sub] - shift, values[sub]
        return [replace_edit(layer, "z", vals[:, cols], p, hs) for layer, cols, hs in layers]

    return make


def test_prefix_reuse_matches_full_forward_per_row_positions(tok, llama):
    """Group D's position differs per row; batched patching with a reused clean KV prefix equals a
    plain per-row forward patched at that row's own position (B5: positions come from the rows)."""
    ex, _, _ = dcm.dcm_examples(tok, 14)
    ps = dcm.make_pair_sets(tok, ex, ["positional"], 0)
    ids, lays = dcm._base_ids(ps)
    pos = dcm._group_positions(lays, ["structure_reader"])["structure_reader"]
    assert len(set(pos.tolist())) > 1
    heads = [(0, 3), (1, 1)]
    vals = torch.randn(14, 2, 16, generator=torch.Generator().manual_seed(3))
    rows = torch.arange(14)
    fast = dcm.PatchRunner(llama, ids, 5, reuse_prefix=True)
    assert fast.reuse_prefix
    with torch.no_grad():
        got = fast.logits(rows, fast.kv(rows), pos, _replace_edits(heads, vals, pos))
        one_start = fast.logits(rows, fast.kv(rows), int(pos.min()), _replace_edits(heads, vals, pos))
        two_buckets = fast.logits(rows, fast.kv(rows), pos, _replace_edits(heads, vals, pos), max_splits=2)
        # one bucket of rows sorted by start: must still come back in row order (a bug once)
        one_bucket = fast.logits(rows, fast.kv(rows), pos, _replace_edits(heads, vals, pos), max_splits=1)
    assert len(set(pos.tolist())) > 2
    torch.testing.assert_close(got, one_start, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, two_buckets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, one_bucket, atol=1e-5, rtol=1e-5)
    hm = head_map(llama)
    for i in range(14):
        edits = [replace_edit(layer, "z", vals[i : i + 1, cols], int(pos[i]), hs) for layer, cols, hs in dcm.by_layer(heads)]
        with torch.no_grad():
            ref = run(llama, hm, {"input_ids": ids[i : i + 1]}, edits).logits[0, -1]
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)
    # the clean pass's argmax is the unpatched model's
    with torch.no_grad():
        clean = llama(input_ids=ids).logits[:, -1].argmax(-1)
    assert fast.base_argmax.tolist() == clean.tolist()


def test_prefix_reuse_does_not_change_results(tok, llama, trained):
    a = trained
    b = dcm.train_masks(llama, tok, HEADS, replace(SMALL, kv_store_mb=0), reuse_prefix=False)
    assert a.timings["prefix_reuse"] == 1.0 and b.timings["prefix_reuse"] == 0.0
    for x, y in zip(a.masks, b.masks):
        assert x.selected == y.selected and x.test_correct == y.test_correct
        assert x.mask == pytest.approx(y.mask, abs=1e-4)


def test_recomputed_clean_caches_equal_stored_ones(tok, llama, trained):
    """With no room to store the clean key/values (kv_store_mb=0) they are recomputed per step, each distinct
    row once though a step repeats every row once per mask: the same masks and test outcomes."""
    b = dcm.train_masks(llama, tok, HEADS, replace(SMALL, kv_store_mb=0))
    for x, y in zip(trained.masks, b.masks):
        assert x.selected == y.selected and x.test_correct == y.test_correct
        assert x.mask == pytest.approx(y.mask, abs=1e-5)


def test_train_masks_seeded_and_complete(tok, llama, trained):
    a = trained
    b = dcm.train_masks(llama, tok, HEADS, SMALL)
    assert [(m.group, m.desideratum) for m in a.masks] == [(g, d) for g in
                                                          ("value_fetcher", "position_transmitter",
                                                           "position_detector", "structure_reader")
                                                          for d in ("positional", "object_value", "box_label_value")]
    assert [(m.mask, m.selected, m.test_correct, m.history) for m in a.masks] == \
           [(m.mask, m.selected, m.test_correct, m.history) for m in b.masks]
    # the seed reaches the base examples and the pair sampling
    ex0, ex1 = dcm.dcm_examples(tok, 8, seed=0)[0], dcm.dcm_examples(tok, 8, seed=1)[0]
    assert ex0 != ex1 and ex0 == dcm.dcm_examples(tok, 8, seed=0)[0]
    p0 = dcm.make_pair_sets(tok, ex0, ["positional"], 0)["positional"]
    p1 = dcm.make_pair_sets(tok, ex0, ["positional"], 1)["positional"]
    assert [p.pair.source for p in p0.pairs] != [p.pair.source for p in p1.pairs]
    for m in a.masks:
        assert len(m.test_correct) == SMALL.n_test and m.test.n == SMALL.n_test
        assert set(m.selected) <= set(m.heads)
    scores = a.scores("toy")
    assert len(scores) == 12 and scores[0].circuit == "toy"
    rows = a.item_rows("toy")
    assert len(rows) == 12 * SMALL.n_test and {"group", "desideratum", "item", "correct"} <= set(rows[0])
    assert "desideratum" in dcm.format_dcm(a)
    assert a.timings["step_s"] > 0 and a.timings["n_masks"] == 12


def test_run_group_single_mask(tok, llama, trained):
    m = dcm.run_group(llama, tok, "C", HEADS["C"], "positional", SMALL)
    assert (m.group, m.desideratum) == ("position_detector", "positional")
    # a group's masks train in one batched forward; alone, a mask follows the same trajectory
    together = trained.get("position_detector", "positional")
    torch.testing.assert_close(torch.tensor(m.mask), torch.tensor(together.mask), atol=1e-5, rtol=0)
    assert m.selected == together.selected and m.history == together.history


def test_semantics_check(tok, llama):
    sel = {("A", "object_value"): [(1, 0)], ("B", "positional"): []}
    a = dcm.semantics_check(llama, tok, sel, n=8, repeats=2, batch_size=4, model_name="toy")
    b = dcm.semantics_check(llama, tok, sel, n=8, repeats=2, batch_size=4, model_name="toy")
    assert [r.accuracies for r in a] == [r.accuracies for r in b]
    assert [len(r.accuracies) for r in a] == [2, 2] and a[0].group == "value_fetcher"
    assert a[0].sd >= 0 and 0 <= a[0].mean <= 1
    assert "mean ± sd" in dcm.format_semantics(a)
    with pytest.raises(EtbenchError, match="do not fit"):
        dcm.semantics_check(llama, tok, {("A", "positional"): [(5, 0)]}, n=4, repeats=1)


def test_input_errors(tok, llama):
    with pytest.raises(EtbenchError, match="unknown DCM preset"):
        dcm.dcm_preset("fast")
    with pytest.raises(EtbenchError, match="do not fit"):
        dcm.train_masks(llama, tok, {"A": [(2, 0)]}, SMALL)
    with pytest.raises(EtbenchError, match="lists a head twice"):
        dcm.normalise_heads({"A": [(1, 0), (1, 0)]})
    with pytest.raises(EtbenchError, match="non-negative integers"):
        dcm.normalise_heads({"A": [(1, -1)]})
    with pytest.raises(EtbenchError, match="at least one group"):
        dcm.train_masks(llama, tok, {"A": []}, SMALL)
    ps = dcm.make_pair_sets(tok, dcm.dcm_examples(tok, 10)[0], ["positional"], 0)
    with pytest.raises(EtbenchError, match="pairs, config needs"):
        dcm.fit_masks(llama, {"A": [(1, 0)]}, ps, SMALL)


def test_source_cache_matches_plain_cache(tok, llama):
    """Each group's heads at its own position (the forward stops after the last layer read)."""
    from etbench.mech.interventions import Site, cache

    ex, _, _ = dcm.dcm_examples(tok, 6)
    lays = [p.source_layout for p in dcm.make_pair_sets(tok, ex, ["positional"], 0)["positional"].pairs]
    hm = head_map(llama)
    heads = {"value_fetcher": ((1, 0), (0, 2)), "structure_reader": ((0, 3),)}
    got = dcm.cache_at_positions(llama, hm, lays, heads, batch_size=4)
    assert got["value_fetcher"].shape == (6, 2, 16) and got["structure_reader"].shape == (6, 1, 16)
    ids = torch.tensor([lay.input_ids for lay in lays])
    for g, cls in (("value_fetcher", "last"), ("structure_reader", "prev_query_label")):
        pos = torch.tensor([lay.position(cls) for lay in lays])
        for col, (layer, head) in enumerate(heads[g]):
            ref = cache(llama, hm, {"input_ids": ids}, [Site(layer, "z", pos, [head])])[(layer, "z")]
            torch.testing.assert_close(got[g][:, col], ref[:, 0])


def test_dataset_sources_reuse_their_partners_clean_run(tok, llama):
    """A dataset source's heads, read over its partner's clean key/values from the first differing token (or the
    first read position), equal a whole forward of the source, for a fraction of the token positions."""
    from etbench.mech.interventions import tallying

    ex, _, _ = dcm.dcm_examples(tok, 12)
    hm = head_map(llama)
    last_heads = {"value_fetcher": ((1, 0), (0, 2)), "position_detector": ((0, 1),)}
    # the structure reader reads an early position (the previous query label): rows start there
    for d, heads in (("positional", last_heads), ("box_label_value", {**last_heads, "structure_reader": ((0, 3),)})):
        ps = dcm.make_pair_sets(tok, ex, [d], 0, sources="dataset")[d]
        ids, lays = dcm._base_ids({d: ps})
        runner = dcm.PatchRunner(llama, ids, 5)
        with tallying() as reused:
            got = dcm._source_values(llama, hm, ps, heads, 5, runner)
        with tallying() as whole:
            ref = dcm.cache_at_positions(llama, hm, [p.source_layout for p in ps.pairs], heads, batch_size=5)
        for g in heads:
            torch.testing.assert_close(got[g], ref[g], atol=1e-5, rtol=1e-5)
        assert reused.forward_tokens < whole.forward_tokens
        if d == "positional":  # only the query differs: every row is fed from its query label on
            assert reused.forward_tokens == 12 * (lays[0].length - lays[0].query_label)
    # without prefix reuse the same values come from whole forwards
    plain = dcm.PatchRunner(llama, ids, 5, reuse_prefix=False)
    for g, values in dcm._source_values(llama, hm, ps, heads, 5, plain).items():
        torch.testing.assert_close(values, ref[g], atol=1e-5, rtol=1e-5)


def test_dataset_sources_in_masks_and_semantics(tok, llama):
    from etbench.mech.interventions import tallying

    cfg = replace(SMALL, sources="dataset")
    with tallying() as dataset_tally:
        a = dcm.train_masks(llama, tok, {"A": HEADS["A"]}, cfg)
    with tallying() as fresh_tally:
        dcm.train_masks(llama, tok, {"A": HEADS["A"]}, SMALL)
    assert [m.desideratum for m in a.masks] == list(dcm.MAIN_DESIDERATA)
    assert [m.test_correct for m in a.masks] == [m.test_correct for m in dcm.train_masks(llama, tok, {"A": HEADS["A"]}, cfg).masks]
    # the same training and test runs; the sources cost a few tokens a row instead of whole prompts
    assert dataset_tally.forward_tokens < fresh_tally.forward_tokens
    assert cfg.to_dict()["sources"] == "dataset" and "sources" not in SMALL.to_dict()
    sel = {("A", "object_value"): [(1, 0)], ("A", "positional"): [(1, 2)]}
    s1 = dcm.semantics_check(llama, tok, sel, n=8, repeats=2, batch_size=4, sources="dataset")
    assert [r.accuracies for r in s1] == [r.accuracies for r in
                                          dcm.semantics_check(llama, tok, sel, n=8, repeats=2, batch_size=4,
                                                              sources="dataset")]
    with pytest.raises(EtbenchError, match="main desiderata only"):
        replace(SMALL, sources="dataset", additional_for=("B",))
    with pytest.raises(EtbenchError, match="sources must be one of"):
        replace(SMALL, sources="nope")
