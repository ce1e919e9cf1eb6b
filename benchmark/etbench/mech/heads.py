"""Where a model's attention heads live, and how to read or write one head at chosen positions.

One vocabulary for every metric (TransformerLens names):

* ``z`` of head ``h`` in layer ``l``: the slice ``[d_head*h : d_head*(h+1)]`` of the **input** of layer
  ``l``'s attention output projection (``o_proj`` / ``out_proj`` / ``c_proj`` / ``dense``), i.e. the head's
  attention-weighted values before ``W_O``. This is the reference's "head output" (docs/method.md §3).
* ``q``, ``k``, ``v``: the head's slice of the **output** of the query/key/value projection, before any
  scaling, RoPE or q/k-norm (the reference patches ``q_proj``/``v_proj`` outputs too, docs/method.md §4).
  ``q`` is indexed by query head ``0..n_heads-1``; ``k``/``v`` by **KV head** ``0..n_kv_heads-1``.
  Under grouped-query attention, query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``
  (``HeadSpec.kv_head``), the order of transformers' ``repeat_kv``; so editing KV head ``g`` changes
  the ``z`` of query heads ``HeadSpec.query_heads(g)`` only.

Why the *input* of the output projection: editing it before the projection runs means the model's own
projection (with any PEFT LoRA on it, merged or not) still applies to the edited ``z``. The reference
instead recomputed ``z @ W_O^T`` from the state dict and so silently dropped Goat's LoRA on ``o_proj``
(bug B3). For the same reason a ``PeftModel`` is only *unwrapped to find* modules; the hooks sit on the
LoRA wrapper modules themselves and the caller keeps calling the ``PeftModel``.

Resolution is structural (bug B4: never compare ``config.architectures[0]``): the decoder layer list is
the ``ModuleList`` of ``n_layers`` blocks that have an attention child; inside it, separate
``q_proj/k_proj/v_proj`` are found by name for any family, and the two fused layouts are known per
``config.model_type`` (GPT-2 ``c_attn`` = [all q | all k | all v]; GPT-NeoX ``query_key_value`` = per
head [q_h | k_h | v_h]). Every size is checked against the modules' shapes, so an unknown layout fails
loudly instead of slicing the wrong numbers.

This module only finds and slices; ``etbench.mech.interventions`` runs the hooked forward passes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from etbench.core.errors import EtbenchError

#: What can be read or written per head.
HEAD_TENSORS: tuple[str, ...] = ("z", "q", "k", "v")

_ATTENTION_NAMES = ("self_attn", "attn", "attention")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense")
_SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
#: Fused q/k/v projections whose layout we know, by (config.model_type, module name).
#: "split": [q of all heads | k of all kv heads | v of all kv heads]; "interleaved": per head [q_h | k_h | v_h].
_FUSED_QKV = {
    ("gpt2", "c_attn"): "split",
    ("gpt_neox", "query_key_value"): "interleaved",
    ("phi3", "qkv_proj"): "split",
}
_SKIP_STACKS = ("vision", "visual", "audio")  # multimodal wrappers also hold encoder layer lists


@dataclass(frozen=True)
class HeadSpec:
    """Sizes and q/k/v layout of a model's attention heads (the same in every layer)."""

    family: str  # config.model_type, for messages only
    n_layers: int
    n_heads: int  # query heads = heads of z
    n_kv_heads: int  # == n_heads unless grouped-query / multi-query attention
    d_head: int
    qkv_layout: str  # "separate" | "split" | "interleaved"

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head whose k/v query head ``head`` attends with (transformers' repeat_kv order)."""
        return head // self.group_size

    def query_heads(self, kv_head: int) -> range:
        return range(kv_head * self.group_size, (kv_head + 1) * self.group_size)

    def n_sites(self, kind: str) -> int:
        """How many heads ``kind`` has per layer: KV heads for k/v, query heads for z/q."""
        _check_kind(kind)
        return self.n_kv_heads if kind in ("k", "v") else self.n_heads


@dataclass(frozen=True)
class LayerModules:
    """The modules of one attention layer; q/k/v are the same module when the projection is fused."""

    out_proj: nn.Module  # its input is the concatenated per-head z
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    out_proj_name: str  # dotted path in the unwrapped model, for messages
    block: nn.Module | None = None  # the decoder layer (accelerate hooks a device_map model per block)


@dataclass(frozen=True)
class HeadMap:
    """A loaded model's heads: the sizes, the module of every layer, and per-head views of their tensors."""

    spec: HeadSpec
    layers: tuple[LayerModules, ...]

    def module(self, layer: int, kind: str) -> nn.Module:
        """The module to hook: for ``z`` its input holds the heads, for q/k/v its output does."""
        _check_kind(kind)
        if not 0 <= layer < self.spec.n_layers:
            raise EtbenchError(f"layer {layer} out of range: the model has {self.spec.n_layers} layers")
        mods = self.layers[layer]
        return {"z": mods.out_proj, "q": mods.q_proj, "k": mods.k_proj, "v": mods.v_proj}[kind]

    def layer_devices(self) -> list[torch.device]:
        """The device each layer computes on: its output projection's weights', or accelerate's
        execution device for a layer whose weights are offloaded (on ``meta`` between calls)."""
        return [_execution_device(mods.out_proj, mods.block) for mods in self.layers]

    def view(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """``[..., n_sites, d_head]`` view of a hooked tensor (o_proj input for z, projection output for q/k/v).

        A view, not a copy: writing into it writes into ``x``."""
        s = self.spec
        d, n = s.d_head, s.n_sites(kind)
        if kind == "z" or s.qkv_layout == "separate":
            _check_width(x, n * d, kind, s)
            return x.unflatten(-1, (n, d))
        if s.qkv_layout == "split":
            _check_width(x, (s.n_heads + 2 * s.n_kv_heads) * d, kind, s)
            start = {"q": 0, "k": s.n_heads * d, "v": (s.n_heads + s.n_kv_heads) * d}[kind]
            return x[..., start : start + n * d].unflatten(-1, (n, d))
        # "interleaved" (GPT-NeoX): view(..., H, 3*D) then chunk(3) in the model's own forward.
        _check_width(x, 3 * s.n_heads * d, kind, s)
        return x.unflatten(-1, (s.n_heads, 3, d))[..., "qkv".index(kind), :]


def _execution_device(module: nn.Module, block: nn.Module | None) -> torch.device:
    # a PEFT wrapper's hook sits on the wrapped layer; a device_map's on the decoder block
    for m in (module, getattr(module, "base_layer", None), block):
        hook = getattr(m, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            device = hook.execution_device
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    param = next(module.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def _check_kind(kind: str) -> None:
    if kind not in HEAD_TENSORS:
        raise EtbenchError(f"unknown head tensor {kind!r}; known: {', '.join(HEAD_TENSORS)}")


def _check_width(x: torch.Tensor, width: int, kind: str, spec: HeadSpec) -> None:
    if x.shape[-1] != width:
        raise EtbenchError(
            f"{spec.family}: the {kind} tensor has width {x.shape[-1]}, expected {width} "
            f"({spec.n_heads} heads, {spec.n_kv_heads} kv heads, d_head {spec.d_head})"
        )


# ----------------------------------------------------------------------------------------------
# Finding the modules


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (LoRA layers stay injected in it); else ``model``."""
    peft = sys.modules.get("peft")  # why: a PeftModel cannot exist unless peft was imported; skip its import cost
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear, GPT-2 Conv1D, or a PEFT wrapper of either."""
    base = getattr(module, "base_layer", module)  # peft LoRA wrapper -> the wrapped layer
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":  # GPT-2: weight is [in, out]
        return tuple(base.weight.shape)  # type: ignore[return-value]
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features
    raise EtbenchError(f"cannot read the shape of projection module {type(base).__name__}")


def _layer_stack(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) != n_layers or any(s in name for s in _SKIP_STACKS):
            continue
        if all(any(hasattr(block, a) for a in _ATTENTION_NAMES) for block in mod):
            found.append((name, mod))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(n for n, _ in found)})"
        raise EtbenchError(f"found {what} decoder layer lists of {n_layers} attention blocks; cannot locate heads")
    return found[0]


def _child(parent: nn.Module, names: Sequence[str], what: str, where: str) -> tuple[str, nn.Module]:
    for n in names:
        if isinstance(getattr(parent, n, None), nn.Module):
            return n, getattr(parent, n)
    raise EtbenchError(f"{where}: no {what} module (looked for {', '.join(names)})")


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_map(model: nn.Module) -> HeadMap:
    """Resolve a loaded causal LM (optionally a ``PeftModel``, merged or not) to its ``HeadMap``."""
    inner = unwrap(model)
    cfg = _text_config(inner)
    family = getattr(cfg, "model_type", type(inner).__name__)
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads  # Gemma/Qwen3: head_dim != hidden/heads

    stack_name, stack = _layer_stack(inner, n_layers)
    layers, layout = [], None
    for i, block in enumerate(stack):
        where = f"{family} layer {i}"
        attn_name, attn = _child(block, _ATTENTION_NAMES, "attention", where)
        out_name, out_proj = _child(attn, _OUT_PROJ_NAMES, "attention output projection", where)
        if all(isinstance(getattr(attn, n, None), nn.Module) for n in _SEPARATE_QKV):
            q, k, v = (getattr(attn, n) for n in _SEPARATE_QKV)
            layer_layout = "separate"
        else:
            fused = [(n, lay) for (mt, n), lay in _FUSED_QKV.items() if mt == family and hasattr(attn, n)]
            if not fused:
                raise EtbenchError(
                    f"{where}: unsupported attention layout (no q_proj/k_proj/v_proj and no known fused "
                    f"projection for model_type {family!r}; known fused: "
                    f"{', '.join(f'{mt}.{n}' for mt, n in _FUSED_QKV)})"
                )
            q = k = v = getattr(attn, fused[0][0])
            layer_layout = fused[0][1]
        layout = layout or layer_layout
        if layer_layout != layout:
            raise EtbenchError(f"{where}: attention layout changes between layers ({layout} vs {layer_layout})")
        _check_shapes(where, out_proj, q, k, v, layout, n_heads, n_kv_heads, d_head)
        layers.append(LayerModules(out_proj, q, k, v, f"{stack_name}.{i}.{attn_name}.{out_name}", block))

    spec = HeadSpec(family, n_layers, n_heads, n_kv_heads, d_head, layout or "separate")
    return HeadMap(spec, tuple(layers))


def _check_shapes(where, out_proj, q, k, v, layout, n_heads, n_kv_heads, d_head) -> None:
    """Fail loudly when config sizes and module shapes disagree (an unknown layout, a bad head_dim)."""
    z_width = _in_out(out_proj)[0]
    if z_width != n_heads * d_head:
        raise EtbenchError(
            f"{where}: output projection takes {z_width} features, but {n_heads} heads x d_head {d_head} "
            f"= {n_heads * d_head}"
        )
    if layout == "separate":
        widths = (_in_out(q)[1], _in_out(k)[1], _in_out(v)[1])
        expected = (n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head)
    elif layout == "split":
        widths, expected = (_in_out(q)[1],), ((n_heads + 2 * n_kv_heads) * d_head,)
    else:  # interleaved has no room for fewer kv heads
        widths, expected = (_in_out(q)[1], n_kv_heads), (3 * n_heads * d_head, n_heads)
    if widths != expected:
        raise EtbenchError(f"{where}: q/k/v projection widths {widths} do not match the config {expected}")


# ----------------------------------------------------------------------------------------------
# Reading and writing heads at positions (pure tensor functions on HeadMap.view tensors)


def as_positions(positions, batch: int, device=None) -> tuple[torch.Tensor, bool]:
    """Positions as a LongTensor ``[B, k]``, and whether the caller gave one position per row.

    Accepts an int (same position in every row), a sequence or tensor of shape ``[B]`` (one per row),
    or ``[B, k]`` (k per row, e.g. padded layouts shifted by ``Batch.offsets``)."""
    pos = torch.as_tensor(positions, dtype=torch.long, device=device)
    if pos.dim() == 0:
        pos = pos.expand(batch)
    single = pos.dim() == 1
    if single:
        pos = pos[:, None]
    if pos.dim() != 2 or pos.shape[0] != batch:
        raise EtbenchError(f"positions must have shape [B] or [B, k] with B = {batch}, got {tuple(pos.shape)}")
    return pos, single


def _index(heads: torch.Tensor, batch: int, seq: int, positions, device):
    """Broadcastable (rows, positions, heads) index tensors, and whether to squeeze the k dim."""
    pos, single = as_positions(positions, batch, device)
    if pos.numel() and (pos.min() < 0 or pos.max() >= seq):  # why: negative indices would silently wrap
        raise EtbenchError(f"positions must lie in 0..{seq - 1} (this forward pass has {seq} tokens)")
    rows = torch.arange(batch, device=device)[:, None, None]
    return rows, pos[:, :, None], heads[None, None, :], single


def _heads(heads, n_sites: int, device) -> torch.Tensor:
    if heads is None:
        return torch.arange(n_sites, device=device)
    h = torch.as_tensor(heads, dtype=torch.long, device=device).reshape(-1)
    if h.numel() and (h.min() < 0 or h.max() >= n_sites):
        raise EtbenchError(f"head index out of range 0..{n_sites - 1}: {h.tolist()}")
    return h


def read_heads(view: torch.Tensor, positions=None, heads=None) -> torch.Tensor:
    """Values of ``heads`` at ``positions`` from a ``[B, S, n, d]`` head view (a copy).

    Returns ``[B, nh, d]`` for positions ``[B]``/int, ``[B, k, nh, d]`` for ``[B, k]``, and
    ``[B, S, nh, d]`` when positions is None (every position)."""
    b, s, n, _ = view.shape
    h = _heads(heads, n, view.device)
    if positions is None:
        return view.index_select(2, h)
    rows, pos, hh, single = _index(h, b, s, positions, view.device)
    out = view[rows, pos, hh]
    return out[:, 0] if single else out


def write_heads(view: torch.Tensor, values: torch.Tensor, positions=None, heads=None) -> None:
    """Write ``values`` (shaped as ``read_heads`` returns them) into the view, in place.

    Differentiable with respect to ``values`` (an index_put): write into a clone of a tensor autograd
    still needs, as ``etbench.mech.interventions`` does."""
    b, s, n, _ = view.shape
    h = _heads(heads, n, view.device)
    if positions is None:
        view[:, :, h] = values.to(view.device, view.dtype)
        return
    rows, pos, hh, single = _index(h, b, s, positions, view.device)
    view[rows, pos, hh] = (values[:, None] if single else values).to(view.device, view.dtype)


# ----------------------------------------------------------------------------------------------
# Weights


@torch.no_grad()
def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight a projection applies, as ``[out, in]`` float32: a Linear's, a GPT-2 Conv1D's transposed, and
    for an unmerged PEFT LoRA wrapper the base weight plus every active adapter's delta (``B A x scaling``), so
    a fine-tune compares the same way whether it ships as an adapter, merged or full."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach().float()
    if type(base).__name__ == "Conv1D":
        weight = weight.T
    delta = getattr(module, "get_delta_weight", None)
    if delta is not None and not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
        for name in module.active_adapters:
            if name in getattr(module, "lora_A", {}):
                weight = weight + delta(name).detach().float().to(weight.device)
    return weight


def head_weight_slices(hm: HeadMap, layer: int, kind: str) -> torch.Tensor:
    """Per head, the part of a projection's weight that belongs to it: ``[n_sites, d_head, d_model]`` rows of
    q/k/v (the head's outputs; KV heads for k/v) or, for ``z``, the output projection's columns that read the
    head (transposed, so also ``[n_heads, d_head, d_model]``)."""
    weight = projection_weight(hm.module(layer, kind))  # [out, in]
    if kind == "z":
        return hm.view("z", weight).permute(1, 2, 0)  # [out, H, d] -> [H, d, out]
    return hm.view(kind, weight.T).permute(1, 2, 0)  # [in, n, d] -> [n, d, in]
