"""A model split over two devices with an accelerate device map, simulated on the CPU: half the layers
offloaded to disk (their weights on ``meta`` between calls, executed on the CPU by accelerate's hooks).
Fast discovery, prefix reuse (a patched run from the stored key/value cache) and faithfulness run on it
without device errors and give the one-device model's numbers. A real split over GPUs (or GPU + CPU) is
covered by tests/bench/bench_gpu.py on a CUDA machine."""

from __future__ import annotations

import copy

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from etbench.mech.forward import device_of  # noqa: E402
from etbench.mech.heads import head_map  # noqa: E402
from etbench.mech.interventions import replace  # noqa: E402
from etbench.mech.prefix import PatchRunner  # noqa: E402
from etbench.metrics.discovery import discover  # noqa: E402
from etbench.metrics.faithfulness import evaluate_circuit  # noqa: E402
from etbench.models.toy import tiny_llama, word_level_tokenizer  # noqa: E402
from etbench.schema.circuit import Circuit, Node  # noqa: E402
from etbench.task.layout import layouts  # noqa: E402
from etbench.task.prompts import generate  # noqa: E402

N_LAYERS, N_HEADS = 4, 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = word_level_tokenizer()
    whole = tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=64, seed=5)
    half = N_LAYERS // 2
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i < half else "disk" for i in range(N_LAYERS)}}
    split = accelerate.dispatch_model(copy.deepcopy(whole), device_map, main_device="cpu",
                                      offload_dir=str(tmp_path_factory.mktemp("offload")))
    return tok, whole, split


def test_the_split_is_real(pair):
    _, _, split = pair
    devices = {p.device.type for p in split.model.layers[N_LAYERS - 1].parameters()}
    assert devices == {"meta"}  # the offloaded half holds no weights between calls
    assert device_of(split).type == "cpu"
    assert [d.type for d in head_map(split).layer_devices()] == ["cpu"] * N_LAYERS  # where each layer executes


def test_fast_discovery_on_the_split_equals_one_device(pair):
    tok, whole, split = pair
    kw = dict(n_boxes=3, n=4, batch_size=4, minimality_mode="none", mean_n=4)
    a, b = discover(whole, "fast", tok, **kw), discover(split, "fast", tok, **kw)
    for g in a.searches:
        for row_a, row_b in zip(a.searches[g].scores, b.searches[g].scores):
            assert row_b == pytest.approx(row_a, abs=1e-5)
    assert all(p.grad is None for p in split.parameters())


def test_prefix_reuse_on_the_split_equals_whole_prompts(pair):
    tok, whole, split = pair
    ids = torch.tensor([lay.input_ids for lay in layouts(generate(n_boxes=3, n=6, seed=0), tok)])
    last = ids.shape[1] - 1
    rows = torch.arange(ids.shape[0])
    source = torch.full((1, 1, 16), 0.5)

    def edits(sub, shift):
        return [replace(N_LAYERS - 1, "z", source, last - shift, heads=[1])]

    def logits(model, reuse):
        runner = PatchRunner(model, ids, batch_size=6, reuse_prefix=reuse)
        assert runner.reuse_prefix == reuse  # the split model's key/value cache was kept per layer
        with torch.no_grad():
            return runner.logits(rows, runner.kv(rows), last, edits)

    reference = logits(whole, False)
    assert torch.allclose(logits(split, True), reference, atol=1e-5)
    assert torch.allclose(logits(split, False), reference, atol=1e-5)
    assert not torch.allclose(logits(whole, False), PatchRunner(whole, ids, batch_size=6).logits(
        rows, None, last, lambda sub, shift: []), atol=1e-5)  # the patch changes the logits


def test_faithfulness_on_the_split_equals_one_device(pair):
    tok, whole, split = pair
    groups = ("value_fetcher", "position_transmitter", "position_detector", "structure_reader")
    nodes = {g: [Node(g, (i + j) % N_LAYERS, (3 * i + j) % N_HEADS) for j in range(2)] for i, g in enumerate(groups)}
    circuit = Circuit(nodes, model="split-test", n_layers=N_LAYERS, n_heads=N_HEADS)
    kw = dict(n_boxes=3, n=8, mean_n=8, batch_size=8, random_draws=1, completeness_draws=1, curve=False)
    a, b = evaluate_circuit(whole, circuit, tok, **kw), evaluate_circuit(split, circuit, tok, **kw)
    assert b.model_correct == a.model_correct and b.circuit_correct == a.circuit_correct
    assert b.baseline.accuracies == a.baseline.accuracies
