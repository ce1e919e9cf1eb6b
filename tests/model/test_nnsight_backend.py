"""etbench.nnsight_backend: the same edit plans through nnsight traces give what the hook backend gives
(per item, for accuracy and CMAP), nnsight's dry run of the NDIF path agrees too, and the NDIF request
is built right (host, API key, model key, a payload that deserialises) without any network."""

from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("nnsight")

from etbench.core.errors import EtbenchError  # noqa: E402
from etbench.mech import interventions as iv  # noqa: E402
from etbench.mech import nnsight_backend as nb  # noqa: E402
from etbench.mech.heads import head_map  # noqa: E402
from etbench.metrics import cmap  # noqa: E402
from etbench.metrics.accuracy import evaluate  # noqa: E402
from etbench.models.toy import tiny_llama, word_level_tokenizer  # noqa: E402
from etbench.task import prompts as data  # noqa: E402

HEADS = {"A": [(1, 0), (1, 2)], "B": [(0, 1), (1, 3)], "C": [(0, 0), (0, 2)], "D": [(0, 3), (1, 1)]}


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    return tiny_llama(len(tok), n_layers=2, n_heads=4, d_model=64, seed=0)


@pytest.fixture(scope="module")
def ft(base):
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _edits():
    return [iv.replace(0, "z", torch.randn(3, 1, 16, generator=torch.Generator().manual_seed(1)), 9, heads=[1]),
            iv.mix(1, "z", torch.randn(3, 2, 16), torch.tensor([0.3, 0.6]), torch.tensor([9, 8, 7]), heads=[0, 2]),
            iv.replace(1, "q", torch.zeros(3, 1, 16), 5, heads=[3]),
            iv.replace(0, "v", torch.ones(4, 16), None)]


def test_edits_and_reads_equal_the_hook_backend(base, tok):
    hm = head_map(base)
    ids = torch.randint(4, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    edits = _edits()
    runner = nb.NnsightRunner(base, tok)
    with torch.no_grad():
        ref = iv.run(base, hm, {"input_ids": ids}, edits).logits
        plain = base(input_ids=ids).logits
        out = runner.run(hm, {"input_ids": ids}, edits).logits
        sites = [iv.Site(0, "z", 9, [1, 2]), iv.Site(1, "v")]
        expected = iv.cache(base, hm, {"input_ids": ids}, sites)
        got = runner.cache(hm, {"input_ids": ids}, sites)
    assert not torch.equal(ref, plain)  # the edits change the output
    assert torch.equal(out, ref)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert tok.padding_side == "right"  # nnsight sets "left" on the tokenizer it holds: a copy


def test_dry_run_of_the_ndif_path_equals_hooks(base, tok):
    """remote="local": nnsight serialises the trace as for NDIF, deserialises it with etbench's own
    modules hidden (shipped by value), and runs it here."""
    hm = head_map(base)
    ids = torch.randint(4, 60, (3, 10), generator=torch.Generator().manual_seed(2))
    edits = _edits()
    runner = nb.NnsightRunner(base, tok, remote="local")
    with torch.no_grad():
        ref = iv.run(base, hm, {"input_ids": ids}, edits).logits
        out = runner.run(hm, {"input_ids": ids}, edits).logits
        got = runner.cache(hm, {"input_ids": ids}, [iv.Site(1, "z", 9, [0])])
        expected = iv.cache(base, hm, {"input_ids": ids}, [iv.Site(1, "z", 9, [0])])
    assert torch.equal(out, ref)
    assert torch.equal(got[(1, "z")], expected[(1, "z")])
    # a read stores into the caller's dict: remotely through a saved slot, seeing the edits listed before it
    def plan(store):
        return [iv.read(0, "z", store, 9, [1], key="before"), *edits, iv.read(0, "z", store, 9, [1], key="after"),
                iv.read(1, "q", store, None, [3])]

    hooks_store, traced_store = {}, {}
    with torch.no_grad():
        ref_mixed = iv.run(base, hm, {"input_ids": ids}, plan(hooks_store)).logits
        traced_mixed = runner.run(hm, {"input_ids": ids}, plan(traced_store)).logits
    assert torch.equal(traced_mixed, ref_mixed)
    assert set(traced_store) == set(hooks_store) == {"before", "after", (1, "q")}
    assert all(torch.equal(traced_store[k], hooks_store[k]) for k in hooks_store)
    assert not torch.equal(hooks_store["before"], hooks_store["after"])  # the replace at (0, z, 9, head 1) is seen
    with pytest.raises(EtbenchError, match="cannot run remotely"):
        runner.run(hm, {"input_ids": ids}, [iv.read(0, "z", {}, detach=False)])


def test_accuracy_per_item_equals_hooks(base, tok):
    examples = data.generate(7, 20, seed=4)
    hooks = evaluate(base, tok, examples, batch_size=8, progress=False)
    with iv.forward_backend(nb.run):
        traced = evaluate(base, tok, examples, batch_size=8, progress=False)
    assert [(i.predicted_id, i.target_logprob) for i in traced.items] == [(i.predicted_id, i.target_logprob)
                                                                       for i in hooks.items]


def test_cmap_per_item_equals_hooks(base, ft, tok):
    examples = data.generate(7, 16, seed=3)
    hooks = cmap.run_cmap(base, ft, tok, HEADS, examples, variants=cmap.VARIANTS, batch_size=8)
    with iv.forward_backend(nb.run):
        traced = cmap.run_cmap(base, ft, tok, HEADS, examples, variants=cmap.VARIANTS, batch_size=8)
    assert traced.base_predicted == hooks.base_predicted and traced.ft_predicted == hooks.ft_predicted
    assert [(r.variant, r.group) for r in traced.runs] == [(r.variant, r.group) for r in hooks.runs]
    assert [r.predicted for r in traced.runs] == [r.predicted for r in hooks.runs]
    assert any(r.predicted != hooks.base_predicted for r in hooks.runs)  # patching changed some predictions


def test_ndif_request_is_built_without_network(base, tok, monkeypatch):
    """The request a --remote run sends: POST <host>/request with the API key header, the model key
    naming the hub repo, and a payload NDIF can deserialise. The websocket and httpx are intercepted:
    nothing leaves this process."""
    import httpx
    import huggingface_hub
    import websocket
    from nnsight.schema.request import RequestModel

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, **kw: types.SimpleNamespace(id=repo_id))
    sent = {}

    class Sent(Exception):
        pass

    def fake_post(self, url, data=None, files=None, headers=None, **kw):
        sent.update(url=url, data=data, blob=files["blob"][1], headers=headers)
        raise Sent()

    class FakeSocket:
        def recv(self):
            return '{"session_id": "s-1"}'

        def close(self):
            pass

    def fake_connection(url, header=None, **kw):
        sent.update(ws_url=url, ws_header=header)
        return FakeSocket()

    monkeypatch.setattr(httpx.Client, "post", fake_post)
    monkeypatch.setattr(websocket, "create_connection", fake_connection)
    model = copy.deepcopy(base)
    model.name_or_path = "meta-llama/Llama-2-7b-hf"  # what the model key names (for_ndif: the repo id)
    runner = nb.NnsightRunner(model, tok, remote=True, api_key="key-123", host="https://ndif.example")
    hm = head_map(model)
    ids = torch.randint(4, 60, (2, 6))
    with pytest.raises(Sent):
        runner.run(hm, {"input_ids": ids}, [iv.replace(1, "z", torch.zeros(2, 1, 16), 5, heads=[2])])
    assert sent["ws_url"] == "wss://ndif.example/subscribe" and sent["ws_header"] == {"ndif-api-key": "key-123"}
    assert sent["url"] == "https://ndif.example/request"
    assert sent["headers"]["ndif-api-key"] == "key-123"
    meta = sent["data"]["data"]
    assert "meta-llama/Llama-2-7b-hf" in meta
    restored = RequestModel.deserialize(sent["blob"], runner.nn_model._remoteable_persistent_objects(),
                                        compress=runner.backend().compress)
    assert restored is not None


def test_remote_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(EtbenchError, match="NDIF_API_KEY"):
        nb.NnsightRunner.for_ndif("meta-llama/Llama-2-7b-hf")


def test_faithfulness_per_item_equals_hooks(base, tok):
    from etbench.metrics.faithfulness import evaluate_circuit
    from etbench.schema.circuit import Circuit, Node

    nodes = {"value_fetcher": [Node("value_fetcher", 1, 0)], "position_transmitter": [Node("position_transmitter", 0, 1)],
             "position_detector": [Node("position_detector", 0, 3)], "structure_reader": [Node("structure_reader", 0, 0)]}
    circuit = Circuit(nodes, model="toy", n_layers=2, n_heads=4)
    kw = dict(n_boxes=3, n=12, mean_n=8, batch_size=6, random_draws=1, completeness_draws=1, curve=False)
    hooks = evaluate_circuit(base, circuit, tok, **kw)
    with iv.forward_backend(nb.run):
        traced = evaluate_circuit(base, circuit, tok, **kw)
    assert traced.model_correct == hooks.model_correct and traced.circuit_correct == hooks.circuit_correct
    assert traced.baseline.accuracies == hooks.baseline.accuracies


def test_gradient_stages_equal_hooks(base, tok):
    """Fast discovery (attribution: gradients w.r.t. head deltas) and DCM (gradients w.r.t. masks)
    through nnsight traces give the hook backend's scores and masks."""
    from dataclasses import replace

    from etbench.metrics import dcm
    from etbench.metrics.discovery import discover

    kw = dict(n_boxes=3, n=4, batch_size=4, minimality_mode="none", mean_n=4)
    cfg = replace(dcm.dcm_preset("quick"), n_train=8, n_val=8, n_test=8, epochs=1, batch_size=8, eval_every=1)
    heads = {"A": [(1, 0), (1, 2)], "B": [(0, 1)]}
    hooks = discover(base, "fast", tok, **kw), dcm.train_masks(base, tok, heads, cfg)
    with iv.forward_backend(nb.run):
        traced = discover(base, "fast", tok, **kw), dcm.train_masks(base, tok, heads, cfg)
    for g in hooks[0].searches:
        for row_t, row_h in zip(traced[0].searches[g].scores, hooks[0].searches[g].scores):
            assert row_t == pytest.approx(row_h, abs=1e-6)
    for m_t, m_h in zip(traced[1].masks, hooks[1].masks):
        assert list(m_t.mask) == pytest.approx(list(m_h.mask), abs=1e-6)
    assert [m.test_correct for m in traced[1].masks] == [m.test_correct for m in hooks[1].masks]
