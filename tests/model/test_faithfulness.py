"""Mean ablation and faithfulness against a naive hand-written implementation, on tiny random Llamas."""

from __future__ import annotations

import random

import pytest
import torch

from etbench.core.errors import EtbenchError
from etbench.mech.forward import PassCounter
from etbench.mech.heads import head_map
from etbench.mech.interventions import run
from etbench.mech.prefix import PatchRunner
from etbench.metrics.ablation import (
    AblationRunner,
    ablated_correct,
    ablation_edits,
    ablation_examples,
    circuit_correct,
    mean_activations,
    sparse_keep_edits,
)
from etbench.metrics.faithfulness import (
    circuit_ranking,
    curve_areas,
    evaluate_circuit,
    evaluation_runner,
    format_evaluation,
    log_grid,
    random_circuit,
)
from etbench.models.toy import tiny_llama, word_level_tokenizer
from etbench.schema.circuit import GROUPS, Circuit, Node, paper_circuit
from etbench.task import prompts as data
from etbench.task.layout import layouts

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def setup():
    tok = word_level_tokenizer()
    model = tiny_llama(len(tok), n_layers=3, n_heads=4, d_model=32, seed=1)
    return model, tok, head_map(model)


def naive_mean_z(model, tok, examples):
    """Hand-written: hook every o_proj, stack all prompts' z, average over prompts."""
    lays = layouts(examples, tok)
    ids = torch.tensor([lay.input_ids for lay in lays])
    zs = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: zs.__setitem__(i, args[0].detach().clone())) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {i: z.mean(0) for i, z in zs.items()}  # [S, H*d]


def naive_ablated_logits(model, ids, lays, mean, keep_nodes, d_head):
    """Loop over rows, positions and heads: keep (layer, head) only at its node's position."""
    def hook_for(layer):
        def hook(mod, args):
            z = args[0].clone()
            for b, lay in enumerate(lays):
                pos = {"last": lay.last, "query_label": lay.query_label, "prev_query_label": lay.prev_query_label}
                for t in range(z.shape[1]):
                    for h in range(z.shape[2] // d_head):
                        kept = any(n.layer == layer and n.head == h and pos[n.position_class] == t for n in keep_nodes)
                        if not kept:
                            z[b, t, h * d_head:(h + 1) * d_head] = mean[layer][t, h * d_head:(h + 1) * d_head]
            return (z,)
        return hook

    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()


def test_ablation_prompts_have_random_query_letters():
    exs = ablation_examples(5, 60, seed=3)
    assert len({ex.context_id for ex in exs}) == 60 and all(ex.query_index == 0 for ex in exs)
    absent = sum(ex.query_label not in ex.labels for ex in exs)
    assert 30 < absent < 60  # ~ 21/26 of letters are absent from a 5-box context
    assert exs == ablation_examples(5, 60, seed=3) and exs != ablation_examples(5, 60, seed=4)


def test_mean_and_ablation_equal_naive(setup):
    model, tok, hm = setup
    mean = mean_activations(model, tok, hm, n_boxes=3, n=10, seed=0, batch_size=4)
    naive = naive_mean_z(model, tok, ablation_examples(3, 10, 0))
    d = hm.spec.d_head
    for layer in range(hm.spec.n_layers):
        assert torch.allclose(mean.z[layer].flatten(1), naive[layer], atol=1e-6)
    examples = data.generate(3, 6, seed=0)
    lays = layouts(examples, tok)
    ids = torch.tensor([lay.input_ids for lay in lays])
    circuit = Circuit.from_heads({"A": [[2, 0], [1, 3]], "B": [[2, 1]], "C": [[1, 1], [0, 2]], "D": [[0, 0], [1, 1]]})
    ours = run(model, hm, {"input_ids": ids}, ablation_edits(hm, mean, lays, keep=circuit.kept())).logits[:, -1]
    reference = naive_ablated_logits(model, ids, lays, {i: z.flatten(1) for i, z in enumerate(mean.z)},
                                     circuit.nodes(), d)
    assert torch.allclose(ours, reference, atol=1e-5)
    full = model(input_ids=ids).logits[:, -1]
    assert not torch.allclose(ours, full, atol=1e-3)  # the ablation did something
    # knock-out mode with no heads = the full model; with every head at every class = circuit of nothing
    assert ablation_edits(hm, mean, lays, ablate={}) == []


def test_keep_everything_at_all_positions_is_identity_only_where_kept(setup):
    """Knock-out of K and keep-mode of (everything minus K) agree at the kept classes' positions."""
    model, tok, hm = setup
    mean = mean_activations(model, tok, hm, n_boxes=3, n=8, seed=0, batch_size=8)
    lays = layouts(data.generate(3, 6, seed=2), tok)
    ids = torch.tensor([lay.input_ids for lay in lays])
    nodes = [Node("A", 2, 1), Node("C", 0, 3)]
    k = {"last": {(2, 1)}, "query_label": {(0, 3)}, "prev_query_label": set()}
    out = run(model, hm, {"input_ids": ids}, ablation_edits(hm, mean, lays, ablate=k)).logits[:, -1]
    # naive: only those heads at those positions are meaned
    def hook_for(layer):
        def hook(mod, args):
            z = args[0].clone()
            for n in nodes:
                if n.layer == layer:
                    for b, lay in enumerate(lays):
                        t = lay.position(n.position_class)
                        z[b, t, n.head * 8:(n.head + 1) * 8] = mean.z[layer][t, n.head]
            return (z,)
        return hook
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, -1]
    for h in hooks:
        h.remove()
    assert torch.allclose(out, ref, atol=1e-5)


def test_planted_heads_outside_s_are_irrelevant(setup):
    """Zeroing W_O of every head outside S makes them invisible: mean-ablating outside S (the
    circuit = S at every class) gives exactly the full model's predictions."""
    _, tok, _ = setup
    model = tiny_llama(len(tok), n_layers=3, n_heads=4, d_model=32, seed=5)
    s = {(0, 1), (1, 2), (2, 0)}
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            for h in range(4):
                if (layer, h) not in s:
                    block.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
    hm = head_map(model)
    mean = mean_activations(model, tok, hm, n_boxes=3, n=8, seed=0)
    lays = layouts(data.generate(3, 9, seed=0), tok)
    ids = torch.tensor([lay.input_ids for lay in lays])
    # S kept at every position class still ablates S at the other positions, so compare the logit
    # effect of the heads outside S only: keep everything, then knock out everything outside S.
    outside = {pc: {(lay, h) for lay in range(3) for h in range(4) if (lay, h) not in s}
               for pc in ("last", "query_label", "prev_query_label")}
    full = run(model, hm, {"input_ids": ids}).logits[:, -1]
    ko = run(model, hm, {"input_ids": ids}, ablation_edits(hm, mean, lays, ablate=outside)).logits[:, -1]
    assert torch.allclose(full, ko, atol=1e-6)
    flags_full = ablated_correct(model, hm, lays, None)
    flags_ko = ablated_correct(model, hm, lays, mean, ablate=outside)
    assert flags_full == flags_ko


def test_paper_circuit_on_a_llama7b_shaped_tiny_model():
    tok = word_level_tokenizer()
    model = tiny_llama(len(tok), n_layers=32, n_heads=32, d_model=64, seed=0)
    hm = head_map(model)
    assert (hm.spec.n_layers, hm.spec.n_heads, hm.spec.d_head) == (32, 32, 2)
    circuit = paper_circuit("llama7b")
    mean = mean_activations(model, tok, hm, n_boxes=7, n=4, seed=0)
    assert mean.z[0].shape == (mean.length, 32, 2)
    lays = layouts(data.generate(7, 4, seed=0), tok)
    edits = ablation_edits(hm, mean, lays, keep=circuit.kept())
    assert sorted(e.layer for e in edits) == list(range(32))  # every layer is meaned somewhere
    counter = PassCounter()
    flags = circuit_correct(model, hm, lays, mean, circuit, counter=counter)
    assert len(flags) == 4 and counter.calls == 1 and counter.tokens == 4 * lays[0].length
    small = tiny_llama(len(tok), n_layers=30, n_heads=9, d_model=36)
    with pytest.raises(EtbenchError, match="does not fit"):
        circuit_correct(small, head_map(small), lays, mean, circuit)


def test_random_circuit_and_ranking():
    rng = random.Random(0)
    sizes = {"value_fetcher": 3, "position_transmitter": 1, "position_detector": 2, "structure_reader": 0}
    c = random_circuit(sizes, 4, 4, rng)
    assert c.group_sizes == sizes and c.method == "random"
    scored = Circuit.from_heads({"A": [[0, 0], [1, 0]], "B": [[2, 0]]}, {"A": [-0.1, -0.3], "B": [-0.2]})
    assert [str(n) for n in circuit_ranking(scored)] == ["A:L1H0", "B:L2H0", "A:L0H0"]
    unscored = Circuit.from_heads({"A": [[0, 0], [1, 0], [3, 3], [2, 2]], "C": [[2, 0], [0, 1]]})
    assert [str(n) for n in circuit_ranking(unscored)] == ["A:L0H0", "A:L1H0", "C:L2H0", "A:L3H3", "A:L2H2", "C:L0H1"]
    assert log_grid(5) == [0, 1, 2, 4, 5] and log_grid(1) == [0, 1] and log_grid(0) == [0]
    area, cmd = curve_areas([0, 1, 2, 4], [0.0, 1.0, 1.0, 1.0], 4)
    assert area == pytest.approx(0.875) and cmd == pytest.approx(0.125)


def test_prefix_reuse_equals_whole_prompt_ablation(setup):
    """Circuit mode on a stored all-meaned prefix, each row run from its earliest kept position, gives
    the logits of mean-ablating whole prompts (and the base run is the empty circuit)."""
    model, tok, hm = setup
    mean = mean_activations(model, tok, hm, n_boxes=3, n=6, seed=0)
    lays = layouts(data.generate(3, 9, seed=0), tok)
    ids = torch.tensor([lay.input_ids for lay in lays])
    circuit = Circuit.from_heads({"A": [[2, 0], [1, 3]], "B": [[2, 1]], "C": [[1, 1]], "D": [[0, 0], [1, 2]]})
    runner = PatchRunner(model, ids, 4, base_edits=lambda rows: ablation_edits(
        hm, mean, [lays[r] for r in rows.tolist()], keep={}))
    rows = torch.arange(len(lays))
    starts = torch.tensor([lay.prev_query_label for lay in lays])
    assert starts.min() > 0 and len(set(starts.tolist())) > 1  # prefixes of several lengths are exercised
    with torch.no_grad():
        got = runner.logits(rows, runner.kv(rows), starts, lambda part, shift: ablation_edits(
            hm, mean, [lays[r] for r in part.tolist()], keep=circuit.kept(), shift=shift))
        ref = run(model, hm, {"input_ids": ids}, ablation_edits(hm, mean, lays, keep=circuit.kept())).logits[:, -1]
        empty = run(model, hm, {"input_ids": ids}, ablation_edits(hm, mean, lays, keep={})).logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert runner.base_argmax.tolist() == empty.argmax(-1).tolist()
    with pytest.raises(EtbenchError, match="before the shift"):
        ablation_edits(hm, mean, lays, keep=circuit.kept(), shift=int(starts.max()) + 1)


def test_sparse_circuit_runs_equal_whole_prompt_ablation(setup):
    """Under mean ablation every head outside the kept positions outputs its mean, so a position's residual
    stream depends on its own token only: a circuit run that computes just the kept positions and the last,
    over the all-meaned run's keys and values of every other position, gives the logits of mean-ablating the
    whole prompts (the hand-written naive loop), for circuits over every subset of the position classes."""
    model, tok, hm = setup
    mean = mean_activations(model, tok, hm, n_boxes=3, n=6, seed=0)
    lays = layouts(data.generate(3, 9, seed=0), tok)
    ids = torch.tensor([lay.input_ids for lay in lays])
    naive_mean = naive_mean_z(model, tok, ablation_examples(3, 6, seed=0))
    runner = PatchRunner(model, ids, 4, base_edits=lambda rows: ablation_edits(
        hm, mean, [lays[r] for r in rows.tolist()], keep={}))
    rows = torch.arange(len(lays))
    full = {"A": [[2, 0], [1, 3]], "B": [[2, 1]], "C": [[1, 1]], "D": [[0, 0], [1, 2]]}
    for groups in (full, {"D": [[0, 0]]}, {"C": [[1, 1]], "D": [[1, 2]]}, {"A": [[2, 0]]}):
        circuit = Circuit.from_heads(groups)
        keep = circuit.kept()
        classes = [pc for pc, heads in keep.items() if heads]
        fed = torch.tensor([sorted({getattr(lay, pc) for pc in classes} | {lay.length - 1}) for lay in lays])
        with torch.no_grad():
            got = runner.logits_at(rows, runner.kv(rows), fed, sparse_keep_edits(hm, mean, lays, keep, fed))
        ref = naive_ablated_logits(model, ids, lays, naive_mean, list(circuit.nodes()), hm.spec.d_head)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_the_ablation_runner_takes_the_sparse_path_only_after_it_agrees_with_the_prefix_path(setup, monkeypatch):
    """AblationRunner checks its first sparse circuit run against the prefix path and keeps the sparse path
    only when they agree; a model whose sparse runs differ (planted here) keeps the prefix path, so its flags
    are the prefix path's either way."""
    model, tok, hm = setup
    mean = mean_activations(model, tok, hm, n_boxes=3, n=6, seed=0)
    lays = layouts(data.generate(3, 24, seed=1), tok)
    circuits = [Circuit.from_heads({"A": [[2, 0], [1, 3]], "B": [[2, 1]], "C": [[1, 1]], "D": [[0, 0]]}),
                Circuit.from_heads({"A": [[2, 2]], "C": [[0, 3]]})]
    prefix = AblationRunner(model, hm, lays, mean, batch_size=4, sparse=False)
    want = [prefix.correct(keep=c.kept()) for c in circuits]
    sparse = AblationRunner(model, hm, lays, mean, batch_size=4)
    assert [sparse.correct(keep=c.kept()) for c in circuits] == want
    assert sparse.sparse is True and sparse.sparse_check["max_abs_logit_diff"] <= 1e-5

    real = PatchRunner.logits_at
    monkeypatch.setattr(PatchRunner, "logits_at", lambda self, *a, **k: real(self, *a, **k) + 0.01)
    planted = AblationRunner(model, hm, lays, mean, batch_size=4)
    assert [planted.correct(keep=c.kept()) for c in circuits] == want
    assert planted.sparse is False and planted.sparse_check["max_abs_logit_diff"] > 0.005


def test_evaluate_circuit_bookkeeping(setup):
    model, tok, _ = setup
    circuit = Circuit.from_heads({"A": [[2, 0], [1, 3]], "B": [[2, 1]], "C": [[1, 1]], "D": [[0, 0]]}, model="toy")
    ev = evaluate_circuit(model, circuit, tok, n_boxes=3, n=9, mean_n=6, batch_size=9, random_draws=2,
                          completeness_draws=2)
    assert ev.model_acc.n == 9 and len(ev.baseline.accuracies) == 2 and len(ev.completeness.random_k) == 2
    assert set(ev.completeness.per_group) == set(GROUPS)
    assert [p.k for p in ev.curve.points] == [0, 1, 2, 4, 5]
    # whole prompts: at most one forward pass of 9 prompts per eval (a head set seen before is
    # memoised): model, circuit, 2 random, 2x2 + 4x2 completeness, 4 curve points (k = 5 is the
    # circuit), + 1 mean pass
    counter = PassCounter()
    whole = evaluation_runner(model, tok, 3, 9, 0, 6, 9, counter=counter, reuse_prefix=False)
    ev_whole = evaluate_circuit(model, circuit, tok, n_boxes=3, n=9, mean_n=6, batch_size=9, random_draws=2,
                                completeness_draws=2, runner=whole)
    assert counter.calls <= 1 + 1 + 2 + 4 + 8 + 4 + 1 and counter.rows == 9 * (counter.calls - 1) + 6
    # the stored-prefix path computes the same numbers from fewer token positions
    same = ("model_acc", "circuit_acc", "faithfulness", "baseline", "completeness", "curve", "circuit_correct")
    assert repr({k: getattr(ev, k) for k in same}) == repr({k: getattr(ev_whole, k) for k in same})  # nan-safe
    assert ev.forward_passes["tokens"] < counter.tokens
    with pytest.raises(EtbenchError, match="other prompts"):
        evaluate_circuit(model, circuit, tok, n_boxes=3, n=8, runner=whole)
    d = ev.to_dict()
    assert d["schema_version"] == 1 and d["model_acc"]["n"] == 9
    assert "faithfulness" in format_evaluation(ev)
