"""Circuit model, file format and shipped paper circuits (discovery tests further down)."""

from __future__ import annotations

import json

import pytest

from etbench.core.errors import EtbenchError
from etbench.schema.circuit import GROUP_POSITION, GROUPS, Circuit, Node, load_circuit, paper_circuit


def small_circuit(**kw) -> Circuit:
    return Circuit.from_heads({"A": [[1, 0], [0, 2]], "B": [[1, 1]], "C": [[0, 1]], "D": [[0, 0], [1, 1]]},
                              {"A": [-0.5, -0.1], "B": [-0.3], "C": [-0.2], "D": [-0.05, -0.01]},
                              model="toy", n_layers=2, n_heads=4, method="manual", parameters={"k": [1, 2]}, **kw)


def test_groups_positions_and_views():
    c = small_circuit()
    assert c.group_sizes == {"value_fetcher": 2, "position_transmitter": 1, "position_detector": 1, "structure_reader": 2}
    assert c.size == 6 and c.distinct_heads == {(1, 0), (0, 2), (1, 1), (0, 1), (0, 0)}
    assert c.heads("A") == [(1, 0), (0, 2)]  # order kept
    kept = c.kept()
    assert kept["last"] == {(1, 0), (0, 2), (1, 1)} and kept["query_label"] == {(0, 1)}
    assert kept["prev_query_label"] == {(0, 0), (1, 1)}
    assert Node("D", 1, 1) in c and Node("C", 1, 1) not in c
    assert Node("a", 0, 0).group == "value_fetcher" and Node("A", 0, 0).position_class == "last"
    assert [GROUP_POSITION[g] for g in GROUPS] == ["last", "last", "query_label", "prev_query_label"]
    assert c.top(1).group_sizes == {g: 1 for g in GROUPS}
    assert c.without([Node("A", 1, 0)]).heads("A") == [(0, 2)]


def test_json_round_trip(tmp_path):
    c = small_circuit(stats={"forward_passes": 12})
    path = c.save(tmp_path / "c.json")
    back = Circuit.load(path)
    assert back == c
    assert [n.score for n in back.nodes()] == [n.score for n in c.nodes()]
    data = json.loads(path.read_text())
    assert data["format"] == "etbench-circuit" and data["schema_version"] == 1
    assert data["model"] == {"name": "toy", "n_layers": 2, "n_heads": 4}
    assert data["method"] == {"name": "manual", "parameters": {"k": [1, 2]}}
    assert data["groups"]["structure_reader"] == {"position": "prev_query_label", "heads": [[0, 0], [1, 1]],
                                                  "scores": [-0.05, -0.01]}
    assert load_circuit(path) == c


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.update(format="other"), "not an etbench circuit"),
    (lambda d: d["groups"].update(extra={"heads": []}), "unknown groups"),
    (lambda d: d["groups"]["value_fetcher"].update(position="query_label"), "must sit at position 'last'"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[0, 1, 2]]), "[layer, head]"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[1, 0], [1, 0]], scores=None), "twice"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[5, 0], [0, 2]]), "out of range"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[0, -1], [0, 2]]), "non-negative"),
])
def test_bad_files_give_clear_errors(tmp_path, mutate, message):
    data = small_circuit().to_dict()
    mutate(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(EtbenchError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        Circuit.load(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(err.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(EtbenchError, match="not found"):
        Circuit.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(EtbenchError, match="not valid JSON"):
        Circuit.load(tmp_path / "x.json")


def test_validate_against_model_shape():
    c = small_circuit()
    c.validate(2, 4)
    with pytest.raises(EtbenchError, match=r"1 layers x 4 heads.*A:L1H0"):
        c.validate(1, 4)


@pytest.mark.parametrize("name, sizes, distinct", [
    ("llama7b", (40, 7, 20, 5), 67), ("goat7b", (68, 28, 40, 39), 151), ("float7b", (68, 29, 40, 38), 154)])
def test_paper_circuits_match_the_reference(name, sizes, distinct):
    c = paper_circuit(name)
    assert tuple(c.group_sizes.values()) == sizes and len(c.distinct_heads) == distinct
    assert (c.n_layers, c.n_heads, c.method) == (32, 32, "paper")
    assert all(n.score is not None for n in c.nodes())
    if name == "llama7b":  # docs/method.md §5, in the repo's order; prominent heads of docs/method.md §3
        assert c.heads("B") == [(14, 27), (11, 23), (12, 23), (19, 12), (13, 0), (16, 2), (13, 14)]
        assert c.heads("D") == [(8, 21), (12, 23), (11, 9), (8, 12), (11, 23)]
        assert c.heads("A")[0] == (15, 13) and (21, 3) in c.heads("A") and c.heads("C")[0] == (10, 3)
        assert c.nodes("B")[0].score == pytest.approx(-0.326, abs=1e-3)
    assert load_circuit(f"paper:{name}") == c
    with pytest.raises(EtbenchError, match="does not fit"):
        c.validate(30, 9)


def test_shipped_tiny_base_circuit():
    c = load_circuit("tiny-base")
    assert (c.n_layers, c.n_heads, c.model) == (30, 9, "tiny-base") and c.size > 0
    assert c.method == "attribution+path_patching" and all(n.score < 0 for n in c.nodes())


def test_unknown_paper_circuit():
    with pytest.raises(EtbenchError, match="shipped: llama7b"):
        paper_circuit("gpt4")


# ----------------------------------------------------------------------------------------------
# Discovery: path patching equals a naive full-sequence implementation; attribution is its derivative


import torch  # noqa: E402

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


def test_minimality_on_stored_prefixes_equals_whole_prompt_ablation(toy, monkeypatch):
    """Minimality evaluates many sub-circuits through one AblationRunner (stored all-meaned prefixes);
    every F, and so every pruning decision, equals whole-prompt mean ablation."""
    import dataclasses

    import etbench.metrics.faithfulness as faithfulness
    from etbench.metrics.ablation import mean_activations
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
    stored = minimality(model, hm, lays, mean, circuit, "pairs", batch_size=4)
    assert len({r["f_without_k_and_v"] for r in stored[1]} | {r["f_without_k"] for r in stored[1]}) > 1

    class WholePrompts(faithfulness.AblationRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "reuse_prefix": False})

    monkeypatch.setattr(faithfulness, "AblationRunner", WholePrompts)
    whole = minimality(model, hm, lays, mean, circuit, "pairs", batch_size=4)
    assert stored == whole and len(stored[1]) == circuit.size
