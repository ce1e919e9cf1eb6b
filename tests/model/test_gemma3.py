"""Gemma-3 (the second model family) on toy random configs shaped like Gemma-3-270M: one KV head shared
by every query head, head_dim wider than hidden/heads, q/k-norm, alternating sliding-window and full
attention layers, query_pre_attn_scalar scaling, attention and final logit soft-capping.

The invariants every metric relies on: editing nothing (or writing back the values read) reproduces
the plain forward exactly; k/v of the single KV head feed every query head; and prefix KV reuse with
sliding-window cache layers equals running whole prompts (and is switched off when a window would drop
prompt tokens).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from etbench.mech.heads import head_map
from etbench.mech.interventions import Edit, Site, cache, read, replace, run
from etbench.mech.prefix import PatchRunner, cache_fits, prefix_cache

V, B, S = 60, 4, 9


def gemma3(sliding_window: int, seed: int = 0) -> tf.Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = tf.Gemma3TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, initializer_range=0.2,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16, attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return tf.Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[4, 32], ids=["window-below-prompt", "window-above-prompt"])
def model(request):
    return gemma3(request.param)


def test_spec_has_one_kv_head_for_all_query_heads(model):
    hm = head_map(model)
    spec = hm.spec
    assert (spec.family, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head, spec.qkv_layout) == (
        "gemma3_text", 3, 4, 1, 16, "separate")
    assert [spec.kv_head(h) for h in range(4)] == [0, 0, 0, 0] and list(spec.query_heads(0)) == [0, 1, 2, 3]
    assert hm.module(1, "z") is model.model.layers[1].self_attn.o_proj
    assert hm.module(2, "k") is model.model.layers[2].self_attn.k_proj  # before k_norm and RoPE


def test_editing_nothing_reproduces_the_plain_forward_exactly(model, ids):
    hm = head_map(model)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        identity = [Edit(layer, kind, lambda cur: cur.clone()) for layer in range(3) for kind in "zqkv"]
        assert torch.equal(run(model, hm, {"input_ids": ids}, identity).logits, plain)
        store: dict = {}
        assert torch.equal(run(model, hm, {"input_ids": ids}, [read(1, "z", store)]).logits, plain)
        # the last-token-only vocabulary projection the metrics use gives the same last-position logits
        last = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(last, plain[:, -1], atol=1e-6, rtol=0)
    assert plain.abs().max() <= 15.0  # final soft-capping is on


def test_k_and_v_of_the_single_kv_head_move_every_query_head(model, ids):
    hm = head_map(model)
    for kind in "kv":
        clean, edited = {}, {}
        noise = torch.randn(B, 16, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            run(model, hm, {"input_ids": ids}, [read(1, "z", clean)])
            run(model, hm, {"input_ids": ids}, [Edit(1, kind, lambda cur: cur + noise[:, None], 2, [0]),
                                                read(1, "z", edited)])
        moved = (edited[(1, "z")] - clean[(1, "z")]).abs().amax(dim=(0, 1, 3))
        assert (moved > 1e-4).all(), (kind, moved)  # all four query heads read KV head 0


def test_patching_one_head_changes_only_that_heads_z(model, ids):
    hm = head_map(model)
    last = torch.full((B,), S - 1)
    src = cache(model, hm, {"input_ids": ids.flip(0)}, [Site(0, "z", last, [3])])[(0, "z")]
    before, after = {}, {}
    with torch.no_grad():
        run(model, hm, {"input_ids": ids}, [read(0, "z", before)])
        run(model, hm, {"input_ids": ids}, [replace(0, "z", src, last, [3]), read(0, "z", after)])
    diff = (after[(0, "z")] - before[(0, "z")]).abs()
    assert diff[:, :, :3].max() == 0 and diff[:, S - 1, 3].max() > 1e-4 and diff[:, : S - 1].max() == 0


def test_prefix_reuse_matches_whole_prompts_with_sliding_window_layers(model, ids):
    hm = head_map(model)
    window = model.config.sliding_window
    values = torch.randn(B, 2, 16, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([S - 1, S - 3, S - 1, S - 2])

    def edits(sub, shift):
        return [replace(2, "z", values[sub], positions[sub] - shift, [1, 2])]

    fast = PatchRunner(model, ids, batch_size=3, reuse_prefix=True)
    # the window-4 layers keep only 3 tokens of a 9-token prompt, so reuse must switch itself off
    assert fast.reuse_prefix == (window > S)
    whole = PatchRunner(model, ids, batch_size=3, reuse_prefix=False)
    rows = torch.arange(B)
    with torch.no_grad():
        got = fast.logits(rows, fast.kv(rows), positions, edits)
        want = whole.logits(rows, whole.kv(rows), positions, edits)
        ref = run(model, hm, {"input_ids": ids}, edits(rows, 0)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want, ref, atol=1e-5, rtol=1e-5)
    assert fast.base_argmax.tolist() == model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    if fast.reuse_prefix:  # the rebuilt prefix keeps the model's own mix of sliding and full layers
        layers = prefix_cache(fast.kv(rows), fast.windows, rows, 5).layers
        assert [layer.is_sliding for layer in layers] == [True, False, True]
        assert [getattr(layer, "sliding_window", None) for layer in layers[::2]] == [window, window]


def test_cache_fits_only_while_every_sliding_window_holds_the_prompt(model, ids):
    """Discovery extends a cached prefix and crops it back: transformers refuses to crop a sliding
    layer whose window has filled, so such a cache must not be reused (discovery runs whole prompts)."""
    with torch.no_grad():
        kv = model(input_ids=ids, use_cache=True).past_key_values
    window = model.config.sliding_window
    assert cache_fits(kv, S) == (window > S)
    if window > S:
        assert cache_fits(kv, window - 1) and not cache_fits(kv, window)
    assert not cache_fits(kv, S - 1)  # the cache already holds more tokens than that
