"""Circuit model, file format and shipped paper circuits (discovery tests further down)."""


from __future__ import annotations

import json

import pytest
import torch  # noqa: E402

from etbench.core.errors import EtbenchError
from etbench.mech.forward import PassCounter  # noqa: E402
from etbench.mech.heads import head_map  # noqa: E402
from etbench.metrics.discovery import (  # noqa: E402
    _RECEIVERS,
    _batches,
    _source_position,
    attribution_scores,
    discover,
    format_discovery,
    path_patching_scores,
)
from etbench.models.toy import tiny_llama, word_level_tokenizer  # noqa: E402
from etbench.schema.circuit import GROUPS, Circuit
from etbench.task import prompts as data  # noqa: E402
from etbench.task.counterfactuals import encode_pairs, noise_pairs  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


D_MODEL, N_HEADS, N_LAYERS = 32, 4, 3


D_HEAD = D_MODEL // N_HEADS


def _rms_norm_float64(self, hidden_states):
    # transformers' LlamaRMSNorm computes in float32 even for a float64 model, which would put
    # ~1e-7 noise on every finite difference below
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def toy():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm.forward
    modeling_llama.LlamaRMSNorm.forward = _rms_norm_float64
    try:
        tok = word_level_tokenizer()
        model = tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL, seed=3).double()
        encoded = encode_pairs(noise_pairs(data.generate(3, 4, seed=1), seed=1), tok)
        yield model, tok, encoded
    finally:
        modeling_llama.LlamaRMSNorm.forward = original


def _hooked(model, pre=None, post=None):
    """Run with raw hooks: pre[layer](z) -> z on o_proj inputs; post[(layer, name)](out) -> out."""
    hs = []
    for layer, block in enumerate(model.model.layers):
        if pre and layer in pre:
            hs.append(block.self_attn.o_proj.register_forward_pre_hook(lambda m, a, f=pre[layer]: (f(a[0].clone()),)))
        for name in ("q_proj", "v_proj"):
            if post and (layer, name) in post:
                hs.append(getattr(block.self_attn, name).register_forward_hook(
                    lambda m, a, o, f=post[(layer, name)]: f(o.clone())))
    return hs


def naive_path_patch(model, encoded, group, sender, receivers, alpha=1.0):
    """The path-patching algorithm (docs/method.md §4) on whole prompts with hand-written hooks, one row-loop at a time."""
    ids = torch.tensor([ep.base_layout.input_ids for ep in encoded])
    src = torch.tensor([ep.source_layout.input_ids for ep in encoded])
    tgt = torch.tensor([ep.target_id for ep in encoded])
    pc = {"value_fetcher": "last", "position_transmitter": "last", "position_detector": "query_label",
          "structure_reader": "prev_query_label"}[group]
    pos = [ep.base_layout.position(pc) for ep in encoded]
    spos = [_source_position(ep, group) for ep in encoded]
    recv = _RECEIVERS[group]

    def record(store):
        return {i: (lambda z, i=i: (store.__setitem__(i, z.clone()), z)[1]) for i in range(N_LAYERS)}

    clean, noise = {}, {}
    with torch.no_grad():
        hs = _hooked(model, pre=record(clean))
        p_clean = model(input_ids=ids).logits[:, -1].softmax(-1).gather(1, tgt[:, None])[:, 0]
        for h in hs:
            h.remove()
        hs = _hooked(model, pre=record(noise))
        model(input_ids=src)
        for h in hs:
            h.remove()
        layer, head = sender

        def freeze(i):
            def f(z):
                for b in range(len(encoded)):
                    if i > layer:
                        z[b, pos[b]:] = clean[i][b, pos[b]:]
                    elif i == layer:
                        sl = slice(head * D_HEAD, (head + 1) * D_HEAD)
                        z[b, pos[b], sl] = clean[i][b, pos[b], sl] + alpha * (noise[i][b, spos[b], sl] - clean[i][b, pos[b], sl])
                return z
            return f

        rpos = pos  # docs/method.md §4: q at the last token (B), v at the query label (C) / previous query label (D)
        name = None if recv is None else {"q": "q_proj", "v": "v_proj"}[recv[1]]
        got = {}

        def grab(key):
            def f(out):
                got[key] = out.clone()
                return out
            return f

        post = {} if recv is None else {(m, name): grab(m) for m, _ in receivers}
        hs = _hooked(model, pre={i: freeze(i) for i in range(N_LAYERS)}, post=post)
        logits = model(input_ids=ids).logits[:, -1]
        for h in hs:
            h.remove()
        if recv is not None:
            def put(m, heads):
                def f(out):
                    for b in range(len(encoded)):
                        for h in heads:
                            sl = slice(h * D_HEAD, (h + 1) * D_HEAD)
                            out[b, rpos[b], sl] = got[m][b, rpos[b], sl]
                    return out
                return f
            heads_by = {}
            for m, h in receivers:
                heads_by.setdefault(m, []).append(h)
            hs = _hooked(model, post={(m, name): put(m, hh) for m, hh in heads_by.items()})
            logits = model(input_ids=ids).logits[:, -1]
            for h in hs:
                h.remove()
        p = logits.softmax(-1).gather(1, tgt[:, None])[:, 0]
    return float(((p - p_clean) / p_clean).mean())


RECEIVERS = {"value_fetcher": [], "position_transmitter": [(2, 1), (1, 3)], "position_detector": [(1, 0), (2, 2)],
             "structure_reader": [(1, 2), (2, 3)]}


@pytest.mark.parametrize("group", GROUPS)
def test_path_patching_equals_naive(toy, group):
    model, _, encoded = toy
    hm = head_map(model)
    senders = [(0, 1), (1, 2), (2, 0)]
    counter = PassCounter()
    ours = path_patching_scores(model, hm, encoded, group, RECEIVERS[group], senders, batch_size=3, counter=counter)
    whole = path_patching_scores(model, hm, encoded, group, RECEIVERS[group], senders, batch_size=4,
                                 prefix_cache=False)
    for s in senders:
        ref = naive_path_patch(model, encoded, group, s, RECEIVERS[group])
        assert ours[s] == pytest.approx(ref, abs=1e-9) and whole[s] == pytest.approx(ref, abs=1e-9)
    if group == "value_fetcher":
        seq = len(encoded[0].base_layout.input_ids)
        # per row: clean prefix (seq - 1) + noise prompt (seq) + clean last token + 1 token per sender
        assert counter.tokens == len(encoded) * (seq - 1 + seq + 1 + len(senders))
    else:
        assert ours[(2, 0)] == 0.0  # a sender at or above every receiver cannot reach them


@pytest.mark.parametrize("group", GROUPS)
def test_attribution_is_the_derivative_of_path_patching(toy, group):
    model, _, encoded = toy
    hm = head_map(model)
    att = attribution_scores(model, hm, encoded, group, RECEIVERS[group], batch_size=4)
    eps = 1e-4  # central difference: error O(eps^2)
    for s in [(0, 1), (1, 2)]:
        slope = (naive_path_patch(model, encoded, group, s, RECEIVERS[group], alpha=eps)
                 - naive_path_patch(model, encoded, group, s, RECEIVERS[group], alpha=-eps)) / (2 * eps)
        assert float(att[s]) == pytest.approx(slope, rel=1e-5, abs=1e-12)
    if group != "value_fetcher":  # above every receiver: no path, no attribution
        assert float(att[(2, 3)]) == 0.0


def _planted(tok, keep):
    model = tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL, seed=7).double()
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            for h in range(N_HEADS):
                if (layer, h) not in keep:
                    block.self_attn.o_proj.weight[:, h * D_HEAD:(h + 1) * D_HEAD] = 0
    return model


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_discovery_on_a_planted_model_finds_only_live_heads(toy, mode):
    """Heads outside S have W_O = 0: they cannot affect anything, so every score outside S is exactly 0
    and the discovered circuit lies inside S."""
    _, tok, _ = toy
    live = {(0, 1), (0, 2), (1, 0), (1, 3), (2, 2)}
    model = _planted(tok, live)
    res = discover(model, mode, tok, n_boxes=3, n=4, batch_size=4, minimality_n=4, mean_n=4,
                   candidate_k=3, receiver_k=3)
    for g, s in res.searches.items():
        for layer in range(N_LAYERS):
            for head in range(N_HEADS):
                if (layer, head) not in live:
                    assert s.scores[layer][head] == 0.0
    assert res.candidate.distinct_heads <= live and res.circuit.distinct_heads <= live
    assert res.candidate.size > 0
    assert all(n.score < 0 for n in res.candidate.nodes())
    assert "forward passes" in format_discovery(res)
    assert res.circuit.stats["forward_passes"]["total_calls"] == res.forward_passes["total_calls"]


def test_fast_verifies_with_exact_scores(toy):
    model, tok, _ = toy
    kw = dict(n_boxes=3, n=4, batch_size=4, minimality_mode="none", candidate_k=2, receiver_k=2)
    exact = discover(model, "exact", tok, **kw)
    fast = discover(model, "fast", tok, verify_k=4, **kw)
    for g in GROUPS:
        s = fast.searches[g]
        verified = [(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS) if s.exact[layer][head]]
        assert len(verified) == 4
        if fast.searches[g].receivers == exact.searches[g].receivers:
            for layer, head in verified:
                assert s.scores[layer][head] == pytest.approx(exact.searches[g].scores[layer][head], abs=1e-9)
    # A, one batch: exact = clean prefix + noise pass + clean suffix + 1 per sender (12 heads);
    # fast = prefix + noise + one frozen pass with backward (the screen; also the clean suffix run),
    # then the exact runs of 4 heads (verification reuses the screen's passes)
    assert exact.searches["value_fetcher"].forward_passes["calls"] == 3 + 12
    assert fast.searches["value_fetcher"].forward_passes["calls"] == 3 + 4
    assert fast.searches["value_fetcher"].forward_passes["backward"] == 1
    assert fast.searches["value_fetcher"].forward_passes["rows"] == 4 * 7
    # per-prompt effects kept for the circuit-overlap bootstrap: the verified heads, in prompt order,
    # averaging to their exact score
    for g in GROUPS:
        kept = fast.item_scores[g]
        assert set(kept) == {h for h in fast.searches[g].ranking[:4]} and all(len(v) == 4 for v in kept.values())
        for (layer, head), effects in kept.items():
            assert sum(effects) / 4 == pytest.approx(fast.searches[g].scores[layer][head], abs=1e-12)
    solo = discover(model, "fast", tok, verify_k=4, **{**kw, "n": 1})  # prompt 0 alone: its effect, unshared
    for (layer, head), effects in solo.item_scores["value_fetcher"].items():
        if (layer, head) in fast.item_scores["value_fetcher"]:
            assert fast.item_scores["value_fetcher"][(layer, head)][0] == pytest.approx(effects[0], abs=1e-9)


def _sender_runs(search, group) -> int:
    """Exact runs of a search's computed senders: 1 per sender for A; 2 (step 1 + step 2) for a
    sender below some receiver, none for one that cannot reach any."""
    top = max((layer for layer, _ in search.receivers), default=None)
    runs = 0
    for layer, row in enumerate(search.exact):
        for ok in row:
            if ok:
                runs += 1 if _RECEIVERS[group] is None else (2 if layer < top else 0)
    return runs


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_shared_setup_passes_change_no_score(toy, mode):
    """discover shares the setup passes across groups (one noise pass for all; A and B share the clean
    prefix and suffix) and, in fast mode, between screen and verification (whose frozen pass is the
    clean suffix run). Every exact score must be bitwise what an unshared path-patching run gives, and
    the setup must cost 7 passes per batch in exact mode (noise; prefix + clean suffix for last, query
    label, previous query label) and 4 in fast mode (no separate clean suffix runs), not 3 per search."""
    model, tok, _ = toy
    hm = head_map(model)
    kw = dict(n_boxes=3, n=6, batch_size=4, minimality_mode="none", candidate_k=2, receiver_k=2)
    res = discover(model, mode, tok, verify_k=5, **kw)
    from etbench.task.layout import pad_id_of, usable_pool

    pool, labels = usable_pool(tok, 3)
    encoded = encode_pairs(noise_pairs(data.generate(n_boxes=3, n=6, seed=0, objects=pool, labels=labels), 0,
                                       pool, labels), tok)
    n_batches = len(_batches(encoded, 4))
    assert n_batches >= 2  # the sharing must hold batch by batch
    runs = 0
    for g in GROUPS:
        s = res.searches[g]
        senders = [(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS) if s.exact[layer][head]]
        alone = path_patching_scores(model, hm, encoded, g, s.receivers, senders, batch_size=4, pad_id=pad_id_of(tok))
        assert all(s.scores[layer][head] == alone[(layer, head)] for layer, head in senders), g
        runs += _sender_runs(s, g) * n_batches
    setup = 7 if mode == "exact" else 4
    screen = 0 if mode == "exact" else n_batches * (1 + 2 * 3)  # A: 1 frozen pass; B-D: + step-2 weights
    assert res.forward_passes["search"]["calls"] == setup * n_batches + screen + runs


def test_discovery_round_trips_to_a_circuit_file(toy, tmp_path):
    model, tok, _ = toy
    res = discover(model, "fast", tok, n_boxes=3, n=4, batch_size=4, minimality_n=4, mean_n=4, model_name="toy")
    path = res.circuit.save(tmp_path / "c.json")
    back = Circuit.load(path)
    assert back == res.circuit and back.method == "attribution+path_patching" and back.model == "toy"
    assert back.parameters["mode"] == "fast" and (back.n_layers, back.n_heads) == (N_LAYERS, N_HEADS)
    json.dumps(res.to_dict())
    with pytest.raises(EtbenchError, match="mode"):
        discover(model, "slow", tok)


def test_minimality_on_stored_prefixes_equals_whole_prompt_ablation(toy):
    """Minimality evaluates many sub-circuits through one AblationRunner (stored all-meaned prefixes);
    every F, and so every pruning decision, equals whole-prompt mean ablation."""
    import dataclasses

    from etbench.metrics.ablation import AblationRunner, mean_activations
    from etbench.metrics.discovery import minimality
    from etbench.task.layout import layouts

    model, tok, _ = toy
    hm = head_map(model)
    mean = mean_activations(model, tok, hm, n_boxes=3, n=6, seed=0)
    lays = layouts(data.generate(3, 8, seed=0), tok)
    # a random toy never says the answer: score against its own unablated prediction instead, so that
    # F varies with the sub-circuit
    with torch.no_grad():
        preds = [int(model(input_ids=torch.tensor([lay.input_ids])).logits[0, -1].argmax()) for lay in lays]
    lays = [dataclasses.replace(lay, target_id=p) for lay, p in zip(lays, preds)]
    circuit = Circuit.from_heads({"A": [[2, 0], [1, 3], [2, 2]], "B": [[2, 1]], "C": [[1, 1], [0, 2]], "D": [[0, 0]]})
    stored = minimality(AblationRunner(model, hm, lays, mean, batch_size=4), circuit, "pairs")
    assert len({r["f_without_k_and_v"] for r in stored[1]} | {r["f_without_k"] for r in stored[1]}) > 1

    whole = minimality(AblationRunner(model, hm, lays, mean, batch_size=4, reuse_prefix=False), circuit, "pairs")
    assert stored == whole and len(stored[1]) == circuit.size
