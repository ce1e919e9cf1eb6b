"""etbench.cmap: exact identities of cross-model patching on tiny models, the paper's head choice,
scores, and the compatibility errors."""

from __future__ import annotations

import copy

import pytest
import torch

from etbench.core.errors import EtbenchError
from etbench.metrics import cmap
from etbench.models.toy import tiny_llama, word_level_tokenizer
from etbench.schema.circuit import Circuit
from etbench.task import prompts as data

HEADS = {"A": [(1, 0), (1, 2)], "B": [(0, 1), (1, 3)], "C": [(0, 0), (0, 2)], "D": [(0, 3), (1, 1)]}
N_LAYERS, N_HEADS = 2, 4


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    return tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=64, seed=0)


@pytest.fixture(scope="module")
def ft_attention_only(base):
    """The base with only its q/k/v projections changed: everything else (W_O, MLPs, embeddings)
    is shared, so a model's z at every position determines its whole output."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in ft.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.5)
    return ft


@pytest.fixture(scope="module")
def examples():
    return data.generate(7, 24, seed=3)


def test_ft_equal_to_base_gives_zero_gain(tok, base, examples):
    res = cmap.run_cmap(base, base, tok, HEADS, examples[:12], variants=cmap.VARIANTS, batch_size=12)
    assert res.ft_predicted == res.base_predicted
    groups = {(r.variant, r.group) for r in res.runs}
    assert ("output", "full") in groups and ("qkv", "value_fetcher") in groups
    assert ("q", "position_detector") not in groups  # input variants: last-token groups only
    for r in res.runs:
        assert r.predicted == res.base_predicted, (r.variant, r.group)
    for s in res.scores(n_resamples=200):
        assert s.gain.value == 0.0 and s.gain.low == 0.0 and s.gain.high == 0.0
        assert s.normalised_gain.value is None and "undefined" in s.normalised_gain.note
    assert "undefined" in cmap.format_cmap(res)


def test_patching_every_head_everywhere_reproduces_ft(tok, base, ft_attention_only, examples):
    all_heads = {"A": [(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)]}
    res = cmap.run_cmap(base, ft_attention_only, tok, all_heads, examples, all_positions=True, groups=["A"])
    assert res.ft_predicted != res.base_predicted  # the fine-tuning changed something
    assert res.get("output", "A").predicted == res.ft_predicted
    assert res.get("output", "A").correct == res.ft_correct


def test_input_qkv_of_last_layer_equals_its_output_patch(tok, base, ft_attention_only, examples):
    """Patching q at the last token and k/v everywhere of every head in the last layer, with all
    earlier z frozen, recomputes exactly the fine-tuned z of those heads at the last token."""
    last = {"A": [(N_LAYERS - 1, h) for h in range(N_HEADS)]}
    res = cmap.run_cmap(base, ft_attention_only, tok, last, examples, variants=("output", "qkv", "q"), groups=["A"])
    assert res.get("qkv", "A").predicted == res.get("output", "A").predicted
    assert res.get("output", "A").predicted != res.base_predicted
    assert res.get("q", "A").predicted != res.get("qkv", "A").predicted


def test_prefix_reuse_does_not_change_cmap(tok, base, ft_attention_only, examples):
    a = cmap.run_cmap(base, ft_attention_only, tok, HEADS, examples, reuse_prefix=True)
    b = cmap.run_cmap(base, ft_attention_only, tok, HEADS, examples, reuse_prefix=False)
    assert [r.predicted for r in a.runs] == [r.predicted for r in b.runs]


def test_head_sets_run_together_equal_each_set_run_alone(tok, base, ft_attention_only, examples):
    """The scorecard's two CMAP head sets (DCM-filtered, with an input variant; the whole circuit, output only)
    share one clean base run and one fine-tuned run per prompt: every prediction equals its set's own call,
    including a head that both sets patch and groups that only one set has."""
    dcm_like = {"A": [(1, 2)], "B": [(1, 3)], "D": [(0, 3), (1, 1)]}
    together = cmap.run_cmap_sets(base, ft_attention_only, tok, {"dcm": (dcm_like, ("output", "qkv")),
                                                                 "circuit": (HEADS, ("output",))}, examples,
                                  batch_size=8)
    for label, (heads, variants) in (("dcm", (dcm_like, ("output", "qkv"))), ("circuit", (HEADS, ("output",)))):
        alone = cmap.run_cmap(base, ft_attention_only, tok, heads, examples, variants=variants, batch_size=8)
        got = together[label]
        assert [(r.variant, r.group, r.heads, r.predicted) for r in got.runs] == \
            [(r.variant, r.group, r.heads, r.predicted) for r in alone.runs]
        assert (got.base_predicted, got.ft_predicted) == (alone.base_predicted, alone.ft_predicted)
        assert got.item_rows() == alone.item_rows()
    assert together["dcm"].get("qkv", "A").predicted != together["dcm"].get("output", "A").predicted or \
        together["dcm"].get("output", "A").predicted != together["dcm"].base_predicted  # the patches did something
    with pytest.raises(EtbenchError, match="at least one head set"):
        cmap.run_cmap_sets(base, ft_attention_only, tok, {}, examples)


def test_scores_and_rows(tok, base, ft_attention_only, examples):
    res = cmap.run_cmap(base, ft_attention_only, tok, HEADS, examples, base_name="b", ft_name="f")
    scores = res.scores(n_resamples=200)
    assert [(s.variant, s.group) for s in scores] == [("output", g) for g in
                                                     ("value_fetcher", "position_transmitter", "position_detector",
                                                      "structure_reader", "full")]
    base_acc = sum(res.base_correct) / len(examples)
    for s, r in zip(scores, res.runs):
        assert s.patched_accuracy.value == pytest.approx(r.accuracy)
        assert s.gain.value == pytest.approx(r.accuracy - base_acc)
        assert s.gain.low <= s.gain.value <= s.gain.high
    rows = res.item_rows()
    assert len(rows) == len(examples) * (2 + len(res.runs))
    assert res.timings["runs"] == 5


def test_normalised_gain_defined_when_ft_differs(tok, base, examples):
    # fabricate outcomes: ft right on items where base is wrong
    res = cmap.CmapResult("b", "f", 7, base_correct=(False,) * 10, ft_correct=(True,) * 5 + (False,) * 5,
                          runs=[cmap.CmapRun("output", "value_fetcher", {}, (True,) * 2 + (False,) * 8)])
    (s,) = res.scores(n_resamples=200)
    assert s.gain.value == pytest.approx(0.2)
    assert s.normalised_gain.value == pytest.approx(0.4)


def test_paper_patch_heads_and_no_aliasing():
    circuit = Circuit.from_heads({"A": [[20, 1], [21, 2], [22, 3]], "B": [[14, 0], [15, 1]], "C": [[9, 0], [10, 1]],
                                  "D": [[8, 2], [8, 3]]})
    sel = {("A", "object_value"): [(21, 2), (20, 1)], ("A", "positional"): [(22, 3)],
           ("B", "positional"): [(15, 1)], ("B", "object_value"): [(14, 0)], ("C", "positional"): [(9, 0)]}
    heads = cmap.paper_patch_heads(circuit, sel)
    assert heads == {"value_fetcher": ((20, 1), (21, 2)), "position_transmitter": ((15, 1),),
                     "position_detector": ((9, 0),), "structure_reader": ((8, 2), (8, 3))}
    again = cmap.paper_patch_heads(circuit, sel)
    assert again == heads and circuit.heads("A") == [(20, 1), (21, 2), (22, 3)]  # B7: nothing extended in place
    with pytest.raises(EtbenchError, match="no DCM positional result for position_detector"):
        cmap.paper_patch_heads(circuit, {("A", "object_value"): [], ("B", "positional"): []})


def test_full_run_patches_each_group_at_its_own_position(tok, base, ft_attention_only, examples):
    one = {"A": HEADS["A"]}
    res = cmap.run_cmap(base, ft_attention_only, tok, one, examples, groups=["A", "full"])
    assert res.get("output", "full").predicted == res.get("output", "A").predicted


def test_errors(tok, base, examples):
    other = tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=2, d_model=64, seed=1)
    with pytest.raises(EtbenchError, match="one architecture"):
        cmap.run_cmap(base, other, tok, HEADS, examples)
    no_bos = word_level_tokenizer(bos=False)
    with pytest.raises(EtbenchError, match="one tokenizer"):
        cmap.run_cmap(base, base, tok, HEADS, examples, tokenizer_ft=no_bos)
    with pytest.raises(EtbenchError, match="unknown CMAP variant"):
        cmap.run_cmap(base, base, tok, HEADS, examples, variants=("z",))
    with pytest.raises(EtbenchError, match="last-token groups only"):
        cmap.run_cmap(base, base, tok, HEADS, examples, variants=("q",), groups=["C"])
    with pytest.raises(EtbenchError, match="do not fit"):
        cmap.run_cmap(base, base, tok, {"A": [(5, 0)]}, examples)
    with pytest.raises(EtbenchError, match="groups without heads"):
        cmap.run_cmap(base, base, tok, {"A": [(1, 0)]}, examples, groups=["B"])
    with pytest.raises(EtbenchError, match="one token length"):
        cmap.run_cmap(base, base, tok, HEADS, examples[:3] + data.generate(3, 3, seed=1))


def test_merged_output_runs_equal_one_plain_run_per_group(tok, base, ft_attention_only, examples):
    """The output variant's patched runs are merged (rows of several runs and batches in one forward, over the
    clean prefix); each run's predictions equal a plain whole-prompt run of the base with that run's fine-tuned
    z written at each group's position, one run at a time."""
    from etbench.mech.heads import head_map
    from etbench.mech.interventions import Site, cache, replace, run
    from etbench.schema.circuit import GROUP_POSITION
    from etbench.task.layout import layouts

    res = cmap.run_cmap(base, ft_attention_only, tok, HEADS, examples, batch_size=5)  # 24 rows: 5 batches
    lays = layouts(examples, tok)
    ids = torch.tensor([lay.input_ids for lay in lays])
    hm_b, hm_f = head_map(base), head_map(ft_attention_only)
    names = {"A": "value_fetcher", "B": "position_transmitter", "C": "position_detector", "D": "structure_reader"}
    for run_group in ("A", "B", "C", "D", "full"):
        groups = list(names) if run_group == "full" else [run_group]
        edits = []
        for code in groups:
            pos = torch.tensor([lay.position(GROUP_POSITION[names[code]]) for lay in lays])
            for layer, head in HEADS[code]:
                z = cache(ft_attention_only, hm_f, {"input_ids": ids}, [Site(layer, "z", pos, [head])])[(layer, "z")]
                edits.append(replace(layer, "z", z, pos, [head]))
        with torch.no_grad():
            want = run(base, hm_b, {"input_ids": ids}, edits).logits[:, -1].argmax(-1).tolist()
        assert list(res.get("output", names.get(run_group, "full")).predicted) == want
    assert res.get("output", "full").predicted != res.base_predicted  # the patches changed predictions
