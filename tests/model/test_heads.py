"""etbench.heads + etbench.interventions on tiny random models of every supported family.

Each family's module paths and q/k/v slicing are written out by hand here (from transformers' own
attention code), independently of heads.py, and serve as the reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from etbench.core.errors import EtbenchError
from etbench.mech.heads import head_map, read_heads
from etbench.mech.interventions import Edit, Site, applied, cache, mix, read, replace, replace_where, run

V, B, S = 50, 3, 7
_COMMON = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
               max_position_embeddings=64, initializer_range=0.2)

# family -> (builder, expected (n_heads, n_kv_heads, d_head, layout), z path, q/k/v paths)
FAMILIES = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON)), (4, 4, 8, "separate"),
              "model.layers.{l}.self_attn.o_proj", "model.layers.{l}.self_attn.{x}_proj"),
    "mistral_gqa": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, num_key_value_heads=2, head_dim=8)),
                    (4, 2, 8, "separate"), "model.layers.{l}.self_attn.o_proj", "model.layers.{l}.self_attn.{x}_proj"),
    "qwen2_gqa": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, num_key_value_heads=2)),
                  (4, 2, 8, "separate"), "model.layers.{l}.self_attn.o_proj", "model.layers.{l}.self_attn.{x}_proj"),
    "gemma_mqa_wide": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=16)),
                       (4, 1, 16, "separate"), "model.layers.{l}.self_attn.o_proj",
                       "model.layers.{l}.self_attn.{x}_proj"),
    "gemma3_text": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=12,
                                                                      sliding_window=4)),
                    (4, 2, 12, "separate"), "model.layers.{l}.self_attn.o_proj",
                    "model.layers.{l}.self_attn.{x}_proj"),
    "qwen3_wide": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16)),
                   (4, 2, 16, "separate"), "model.layers.{l}.self_attn.o_proj",
                   "model.layers.{l}.self_attn.{x}_proj"),
    "phi3_fused_gqa": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0,
                                                                bos_token_id=0, eos_token_id=0)),
                       (4, 2, 8, "split"), "model.layers.{l}.self_attn.o_proj", "model.layers.{l}.self_attn.qkv_proj"),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_layer=2, n_head=4, n_embd=32, n_positions=64,
                                                      initializer_range=0.2, bos_token_id=0, eos_token_id=0)),
             (4, 4, 8, "split"), "transformer.h.{l}.attn.c_proj", "transformer.h.{l}.attn.c_attn"),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_COMMON, bos_token_id=0, eos_token_id=0)),
                 (4, 4, 8, "interleaved"), "gpt_neox.layers.{l}.attention.dense",
                 "gpt_neox.layers.{l}.attention.query_key_value"),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, num_hidden_layers=2, num_attention_heads=4,
                                                   hidden_size=32, ffn_dim=64, max_position_embeddings=64,
                                                   word_embed_proj_dim=32, init_std=0.2, bos_token_id=0,
                                                   eos_token_id=0, pad_token_id=1)),
            (4, 4, 8, "separate"), "model.decoder.layers.{l}.self_attn.out_proj",
            "model.decoder.layers.{l}.self_attn.{x}_proj"),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: spec[0]().eval() for name, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, V, (B, S), generator=g), torch.randint(4, V, (B, S), generator=g)


def _logits(model, input_ids, edits=(), hm=None):
    with torch.no_grad():
        if not edits:
            return model(input_ids=input_ids).logits
        return run(model, hm, {"input_ids": input_ids}, edits).logits


def _manual_qkv(name: str, out: torch.Tensor, kind: str, head: int) -> torch.Tensor:
    """A head's q/k/v from the projection output, sliced the way each family's forward slices it."""
    n_heads, n_kv, d, layout = FAMILIES[name][1]
    if layout == "separate":
        return out[..., d * head : d * (head + 1)]
    if layout == "split":  # GPT2Attention c_attn(x).split(embed_dim); Phi3Attention qkv[..., :query_pos] etc.
        q, k, v = out.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
        return {"q": q, "k": k, "v": v}[kind][..., d * head : d * (head + 1)]
    # GPTNeoXAttention: view(..., H, 3D).chunk(3, dim=-1)
    return out.view(*out.shape[:-1], n_heads, 3 * d).chunk(3, dim=-1)["qkv".index(kind)][..., head, :]


# ------------------------------------------------------------------------------------------ (spec)


@pytest.mark.parametrize("name", FAMILIES)
def test_head_spec_and_modules(models, name):
    model = models[name]
    hm = head_map(model)
    n_heads, n_kv, d, layout = FAMILIES[name][1]
    assert (hm.spec.n_layers, hm.spec.n_heads, hm.spec.n_kv_heads, hm.spec.d_head, hm.spec.qkv_layout) == (
        2, n_heads, n_kv, d, layout)
    for layer in range(2):
        assert hm.module(layer, "z") is model.get_submodule(FAMILIES[name][2].format(l=layer))
        for x in "qkv":
            assert hm.module(layer, x) is model.get_submodule(FAMILIES[name][3].format(l=layer, x=x))


def test_gqa_mapping_matches_repeat_kv():
    hm = head_map(tf.MistralForCausalLM(tf.MistralConfig(**{**_COMMON, "num_attention_heads": 8},
                                                         num_key_value_heads=2, head_dim=4)))
    assert [hm.spec.kv_head(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert list(hm.spec.query_heads(1)) == [4, 5, 6, 7]
    assert hm.spec.n_sites("k") == 2 and hm.spec.n_sites("z") == 8


# ------------------------------------------------------------------------------------------ (a)


@pytest.mark.parametrize("name", FAMILIES)
def test_writing_back_own_values_keeps_logits(models, ids, name):
    model, (x, _) = models[name], ids
    hm = head_map(model)
    clean = _logits(model, x)
    pos = torch.tensor([[1, 4], [0, 6], [3, 5]])  # [B, k], different per row
    edits = [Edit(layer, kind, lambda cur: cur.clone(), positions) for layer in range(2) for kind in "zqkv"
             for positions in (None, pos)]
    assert torch.allclose(_logits(model, x, edits, hm), clean, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ (b)


@pytest.mark.parametrize("name", FAMILIES)
def test_patching_z_equals_hand_rolled_hook(models, ids, name):
    model, (base, source) = models[name], ids
    hm = head_map(model)
    d = hm.spec.d_head
    layer, head = 1, 2
    src_pos, base_pos = torch.tensor([6, 3, 5]), torch.tensor([2, 6, 4])
    o_proj = model.get_submodule(FAMILIES[name][2].format(l=layer))

    # Reference: slice the output projection's input by hand.
    grabbed = {}
    h = o_proj.register_forward_pre_hook(lambda m, a: grabbed.setdefault("z", a[0].detach().clone()))
    _logits(model, source)
    h.remove()

    def patch(m, a):
        z = a[0].clone()
        for b in range(B):
            z[b, base_pos[b], d * head : d * (head + 1)] = grabbed["z"][b, src_pos[b], d * head : d * (head + 1)]
        return (z,)

    h = o_proj.register_forward_pre_hook(patch)
    expected = _logits(model, base)
    h.remove()

    src = cache(model, hm, {"input_ids": source}, [Site(layer, "z", src_pos, [head])])[(layer, "z")]
    assert src.shape == (B, 1, d)
    got = _logits(model, base, [replace(layer, "z", src, base_pos, [head])], hm)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, _logits(model, base), atol=1e-4)  # the patch did something


# ------------------------------------------------------------------------------------------ (c)


@pytest.mark.parametrize("name", FAMILIES)
def test_reading_qkv_equals_projection_slices(models, ids, name):
    model, (x, _) = models[name], ids
    hm = head_map(model)
    layer, pos = 1, torch.tensor([[0, 5], [2, 3], [6, 6]])
    outs = {}
    handles = [model.get_submodule(FAMILIES[name][3].format(l=layer, x=k)).register_forward_hook(
        lambda m, a, o, k=k: outs.setdefault(k, o.detach().clone())) for k in "qkv"]
    _logits(model, x)
    for h in handles:
        h.remove()

    got = cache(model, hm, {"input_ids": x}, [Site(layer, k, pos) for k in "qkv"])
    rows = torch.arange(B)[:, None]
    for kind in "qkv":
        n = hm.spec.n_sites(kind)
        assert got[(layer, kind)].shape == (B, 2, n, hm.spec.d_head)
        for head in range(n):
            want = _manual_qkv(name, outs[kind], kind, head)[rows, pos]
            assert torch.equal(got[(layer, kind)][:, :, head], want), (kind, head)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_editing_one_qkv_head_moves_only_its_query_heads(models, ids, name, kind):
    """Independent check of the layout and of the GQA mapping against the model's own attention."""
    model, (x, _) = models[name], ids
    hm = head_map(model)
    layer, site, t = 1, hm.spec.n_sites(kind) - 1, 3
    noise = torch.randn(B, hm.spec.d_head, generator=torch.Generator().manual_seed(2))
    store_clean, store_edit = {}, {}
    _logits(model, x, [read(layer, "z", store_clean)], hm)
    _logits(model, x, [Edit(layer, kind, lambda cur: cur + noise[:, None], t, [site]), read(layer, "z", store_edit)], hm)
    moved = (store_edit[(layer, "z")] - store_clean[(layer, "z")]).abs().amax(dim=(0, 1, 3))  # per query head
    owners = {site} if kind == "q" else set(hm.spec.query_heads(site))
    for head in range(hm.spec.n_heads):
        if head in owners:
            assert moved[head] > 1e-4, (head, moved)
        else:
            assert moved[head] < 1e-6, (head, moved)


# ------------------------------------------------------------------------------------------ (d)


@pytest.fixture(scope="module")
def lora_llama():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, num_key_value_heads=2)).eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero, which would make the adapter a no-op
            torch.nn.init.normal_(p, std=0.5)
    return base, peft_model.eval()


def test_lora_stays_active_under_identity_intervention(lora_llama, ids):
    base, peft_model = lora_llama
    x = ids[0]
    hm = head_map(peft_model)
    assert type(hm.module(0, "z")).__name__ == "Linear" and hasattr(hm.module(0, "z"), "lora_A")  # the LoRA wrapper
    lora_logits, base_logits = _logits(peft_model, x), _logits(base, x)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    edits = [Edit(layer, kind, lambda cur: cur.clone()) for layer in range(2) for kind in "zqkv"]
    assert torch.equal(_logits(peft_model, x, edits, hm), lora_logits)


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
def test_lora_on_o_proj_applies_to_patched_z(lora_llama, ids, merge):
    """Patching z in the unmerged PeftModel equals patching it in the merged model (bug B3 would differ)."""
    _, peft_model = lora_llama
    base_ids, src_ids = ids
    merged = copy.deepcopy(peft_model)
    merged = merged.merge_and_unload() if merge == "merge_and_unload" else (merged.merge_adapter() or merged)
    hm_peft, hm_merged = head_map(peft_model), head_map(merged)
    assert hm_merged.spec == hm_peft.spec
    pos = torch.tensor([6, 2, 4])
    src = cache(peft_model, hm_peft, {"input_ids": src_ids}, [Site(1, "z", pos, [0, 3])])[(1, "z")]
    got = _logits(peft_model, base_ids, [replace(1, "z", src, pos, [0, 3])], hm_peft)
    want = _logits(merged, base_ids, [replace(1, "z", src, pos, [0, 3])], hm_merged)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, _logits(peft_model, base_ids), atol=1e-4)


# ------------------------------------------------------------------------------------------ (e)


def test_cache_stores_only_requested_positions_and_heads(models, ids):
    model, (x, _) = models["gemma3_text"], ids  # GQA and d_head != hidden/heads
    hm = head_map(model)
    got = cache(model, hm, {"input_ids": x}, [
        Site(0, "z", torch.tensor([6, 5, 4])),  # [B] -> [B, nh, d]
        Site(1, "z", torch.tensor([[1, 2, 3]] * B), [1, 3]),  # [B, k]
        Site(0, "k", 2, [1]),  # one int for every row; k/v heads are KV heads
        Site(1, "v"),  # None = every position
    ])
    assert got[(0, "z")].shape == (B, 4, 12)
    assert got[(1, "z")].shape == (B, 3, 2, 12)
    assert got[(0, "k")].shape == (B, 1, 12)
    assert got[(1, "v")].shape == (B, S, 2, 12)
    assert all(not t.requires_grad for t in got.values())


def test_read_heads_positions_per_row():
    view = torch.arange(2 * 5 * 3 * 2, dtype=torch.float).view(2, 5, 3, 2)
    out = read_heads(view, torch.tensor([4, 1]), [2, 0])
    assert torch.equal(out[0], view[0, 4][[2, 0]]) and torch.equal(out[1], view[1, 1][[2, 0]])


# ------------------------------------------------------------------------------------------ mixing


def test_mix_has_gradient_and_interpolates(models, ids):
    model, (base, source) = models["mistral_gqa"], ids
    hm = head_map(model)
    heads, pos = [0, 2], torch.tensor([6, 5, 6])
    src = {L: cache(model, hm, {"input_ids": source}, [Site(L, "z", pos, heads)])[(L, "z")] for L in range(2)}

    mask = torch.nn.Parameter(torch.full((2, 2), 0.5))
    logits = run(model, hm, {"input_ids": base}, [mix(L, "z", src[L], mask[L], pos, heads) for L in range(2)]).logits
    logits[:, -1, 7].mean().backward()
    assert mask.grad is not None and mask.grad.abs().min() > 0

    ones, zeros = torch.ones(2), torch.zeros(2)
    assert torch.allclose(_logits(model, base, [mix(L, "z", src[L], ones, pos, heads) for L in range(2)], hm),
                          _logits(model, base), atol=1e-6)
    assert torch.allclose(_logits(model, base, [mix(L, "z", src[L], zeros, pos, heads) for L in range(2)], hm),
                          _logits(model, base, [replace(L, "z", src[L], pos, heads) for L in range(2)], hm),
                          atol=1e-6)


def test_hooks_are_removed(models, ids):
    model, (x, _) = models["llama"], ids
    hm = head_map(model)
    clean = _logits(model, x)
    with pytest.raises(RuntimeError):
        with applied(hm, [replace(0, "z", torch.zeros(1), None)]):
            raise RuntimeError
    assert torch.equal(_logits(model, x), clean)


# ------------------------------------------------------------------------------------------ errors


def test_clear_errors(models, ids):
    model, (x, _) = models["llama"], ids
    hm = head_map(model)
    with pytest.raises(EtbenchError, match="layer 5"):
        hm.module(5, "z")
    with pytest.raises(EtbenchError, match="unknown head tensor"):
        hm.module(0, "o")
    with pytest.raises(EtbenchError, match="positions must have shape"):
        cache(model, hm, {"input_ids": x}, [Site(0, "z", torch.tensor([1, 2]))])
    with pytest.raises(EtbenchError, match="positions must lie in 0..6"):
        cache(model, hm, {"input_ids": x}, [Site(0, "z", -1)])
    with pytest.raises(EtbenchError, match="head index out of range"):
        cache(model, hm, {"input_ids": x}, [Site(0, "k", 1, [4])])
    with pytest.raises(EtbenchError, match="decoder layer lists"):
        head_map(_NoLayers())


class _NoLayers(torch.nn.Module):
    class config:  # noqa: N801 - mimics a transformers config
        model_type, num_hidden_layers, num_attention_heads, hidden_size = "none", 2, 2, 4


def test_replace_where_keeps_marked_heads_and_positions(models, ids):
    model, (x, _) = models["qwen2_gqa"], ids
    hm = head_map(model)
    mean = torch.zeros(S, 4, 8)  # zero-ablate everything ...
    keep = torch.zeros(B, S, 4, dtype=torch.bool)
    keep[torch.arange(B), torch.tensor([6, 5, 4]), 1] = True  # ... except head 1 at one position per row
    store = {}
    _logits(model, x, [replace_where(1, "z", mean, keep), read(1, "z", store)], hm)
    clean = cache(model, hm, {"input_ids": x}, [Site(1, "z")])[(1, "z")]
    got = store[(1, "z")]
    assert torch.equal(got[keep], clean[keep]) and torch.all(got[~keep] == 0)


def test_cache_rejects_duplicate_sites(models, ids):
    model, (x, _) = models["llama"], ids
    with pytest.raises(EtbenchError, match="share a"):
        cache(model, head_map(model), {"input_ids": x}, [Site(0, "z", 1), Site(0, "z", 2)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_layout_positions_survive_padding(side):
    """Positions from etbench.layout index the same token's z whether a row is padded or not."""
    from etbench.models import toy
    from etbench.task import prompts as data
    from etbench.task.layout import layouts, pad_batch

    tok = toy.word_level_tokenizer()
    model = toy.tiny_llama(len(tok), n_layers=2, n_heads=4, d_model=32)
    hm = head_map(model)
    lays = layouts(data.generate(n_boxes=3, n=2, seed=0) + data.generate(n_boxes=5, n=1, seed=0), tok)
    batch = pad_batch(lays, pad_id=tok.pad_token_id or 0, padding_side=side)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": batch.position_ids}
    pos = torch.stack([batch.positions(lays, c) for c in ("query_label", "prev_query_label", "last")], dim=1)
    got = cache(model, hm, inputs, [Site(1, "z", pos, [0, 3])])[(1, "z")]
    for i, lay in enumerate(lays):
        one = torch.tensor([lay.input_ids])
        want = cache(model, hm, {"input_ids": one},
                     [Site(1, "z", torch.tensor([[lay.query_label, lay.prev_query_label, lay.last]]), [0, 3])])
        assert torch.allclose(got[i], want[(1, "z")][0], atol=1e-5), i
