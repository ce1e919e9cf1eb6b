"""A kept head ablation: attention heads replaced by a constant (their mean output) inside the weights.

A planted model (``etbench.training.planted``) is trained while every head outside a chosen set is
mean-ablated, and it keeps that ablation: its adapter directory carries ``kept_ablation.safetensors``
and loading folds it into each layer's attention output projection. The removed heads' input columns
of ``W_O`` are zeroed and their mean contribution ``W_O[:, h] @ mean_z_h`` becomes the projection's
bias, so the result is a plain causal LM in which the removed heads carry no information at any
position. Every analysis sees that model without knowing about the ablation, which is what makes it
a known answer: a circuit search may only find heads that were kept.

The file holds, per layer with removed heads, ``layer.<i>.heads`` (int64 ``[k]``) and
``layer.<i>.mean_z`` (float32 ``[k, d_head]``), and the metadata ``n_layers``/``n_heads``/``d_head``.
Only architectures whose output projection reads the heads' outputs concatenated in head order
(Llama, Mistral, Qwen, Gemma, ...: ``self_attn.o_proj``) are supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from etbench.core.errors import EtbenchError, one_line
from etbench.core.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch

KEPT_ABLATION_FILE = "kept_ablation.safetensors"
# torch is imported inside the functions, as in models.load: resolving and listing models stays torch-free.


@dataclass(frozen=True)
class KeptAblation:
    """Which heads are removed in each layer, and the mean output ``z`` each is replaced by."""

    n_layers: int
    n_heads: int
    d_head: int
    removed: Mapping[int, tuple[tuple[int, ...], torch.Tensor]]  # layer -> (heads, mean_z [k, d_head])

    def removed_heads(self) -> set[tuple[int, int]]:
        return {(layer, head) for layer, (heads, _) in self.removed.items() for head in heads}

    def kept_heads(self) -> set[tuple[int, int]]:
        every = {(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)}
        return every - self.removed_heads()


def save_kept_ablation(ablation: KeptAblation, path: Path) -> None:
    import torch
    from safetensors.torch import save

    tensors = {}
    for layer, (heads, mean_z) in sorted(ablation.removed.items()):
        tensors[f"layer.{layer}.heads"] = torch.tensor(heads, dtype=torch.int64)
        tensors[f"layer.{layer}.mean_z"] = mean_z.detach().to(torch.float32).contiguous().cpu()
    meta = {"n_layers": str(ablation.n_layers), "n_heads": str(ablation.n_heads), "d_head": str(ablation.d_head)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_kept_ablation(path: Path) -> KeptAblation:
    """The file's ablation; a malformed file is one ``EtbenchError`` naming it."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            n_layers, n_heads, d_head = (int(meta[key]) for key in ("n_layers", "n_heads", "d_head"))
            removed = {}
            for key in handle.keys():
                if key.endswith(".heads"):
                    layer = int(key.split(".")[1])
                    head_ids = handle.get_tensor(key)
                    if head_ids.is_floating_point() or head_ids.dtype == torch.bool or head_ids.dim() != 1:
                        raise ValueError(f"{key}: head indices must be a 1-d integer tensor")
                    heads = tuple(int(h) for h in head_ids.tolist())
                    mean_z = handle.get_tensor(f"layer.{layer}.mean_z")
                    if not 0 <= layer < n_layers or any(not 0 <= h < n_heads for h in heads) \
                            or tuple(mean_z.shape) != (len(heads), d_head) or len(set(heads)) != len(heads):
                        raise ValueError(f"layer {layer}: heads or mean_z out of range")
                    # folded into a bias, one non-finite mean makes every logit of the model NaN
                    if not mean_z.is_floating_point() or not torch.isfinite(mean_z).all():
                        raise ValueError(f"layer {layer}: mean_z is not all finite floats")
                    removed[layer] = (heads, mean_z)
            # every tensor is one of a layer's pair: a stray or misnamed one means another format, not this one
            expected = {f"layer.{layer}.{part}" for layer in removed for part in ("heads", "mean_z")}
            stray = sorted(set(handle.keys()) - expected)
            if stray:
                raise ValueError(f"unexpected tensors {stray[:3]}")
            if not removed:
                raise ValueError("it removes no head")
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as err:
        raise EtbenchError(f"{path}: not a kept-ablation file ({one_line(err)})") from None
    return KeptAblation(n_layers, n_heads, d_head, removed)


def _output_projections(model) -> list:
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise EtbenchError(f"{type(model).__name__}: a kept ablation needs a decoder with .layers")
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        proj = getattr(attn, "o_proj", None)
        if not isinstance(proj, torch.nn.Linear):
            raise EtbenchError(f"{type(model).__name__}: layer {i} has no self_attn.o_proj linear layer; "
                               "a kept ablation supports Llama-style attention only")
        out.append((attn, proj))
    return out


def fold_kept_ablation(model, ablation: KeptAblation) -> None:
    """Fold ``ablation`` into ``model``'s weights in place (see the module docstring)."""
    import torch

    with torch.no_grad():
        _fold(model, ablation)


def _fold(model, ablation: KeptAblation) -> None:
    import torch

    projections = _output_projections(model)
    if len(projections) != ablation.n_layers:
        raise EtbenchError(f"kept ablation is for {ablation.n_layers} layers, the model has {len(projections)}")
    # The head layout, not only the width: 4 heads of 8 read the same 32 features as 8 heads of 4, and folding
    # one for the other would zero the wrong columns. Checked for every layer before any weight changes.
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = getattr(config, "num_attention_heads", None)
    d_head = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", 0) // n_heads if n_heads else None)
    if n_heads is not None and (n_heads, d_head) != (ablation.n_heads, ablation.d_head):
        raise EtbenchError(f"kept ablation is for {ablation.n_heads} heads of width {ablation.d_head}; the model has "
                           f"{n_heads} heads of width {d_head}")
    for layer in ablation.removed:
        if projections[layer][1].in_features != ablation.n_heads * ablation.d_head:
            raise EtbenchError(f"kept ablation is for {ablation.n_heads} heads of width {ablation.d_head}; "
                               f"layer {layer}'s output projection reads {projections[layer][1].in_features} "
                               "features")
    for layer, (heads, mean_z) in ablation.removed.items():
        attn, proj = projections[layer]
        weight = proj.weight
        bias = torch.zeros(proj.out_features, dtype=torch.float64, device=weight.device)
        if proj.bias is not None:
            bias += proj.bias.to(torch.float64)
        for head, z in zip(heads, mean_z):
            cols = slice(head * ablation.d_head, (head + 1) * ablation.d_head)
            bias += weight[:, cols].to(torch.float64) @ z.to(device=weight.device, dtype=torch.float64)
            weight[:, cols] = 0
        if proj.bias is None:  # Llama's o_proj has no bias: swap in an identical linear layer that has one
            folded = torch.nn.Linear(proj.in_features, proj.out_features, bias=True, device=weight.device,
                                     dtype=weight.dtype)
            folded.weight.copy_(weight)
            attn.o_proj = proj = folded
        proj.bias.copy_(bias.to(proj.bias.dtype))


#: An output projection's module name as peft matches target_modules against it (Llama-style models).
_O_PROJ_KEY = "model.layers.0.self_attn.o_proj"


def _names_o_proj(targets) -> bool:
    """Whether peft would put a module on o_proj for ``targets`` (its matching rules: "all-linear" is every
    linear layer, a string is a regex over the full module name, a list entry is the name or a suffix of it)."""
    import re

    if not targets:
        return False
    if isinstance(targets, str):
        try:
            return targets == "all-linear" or re.fullmatch(targets, _O_PROJ_KEY) is not None
        except re.error:
            return True  # peft could not read it either; refuse rather than guess
    return any(isinstance(t, str) and (t == _O_PROJ_KEY or _O_PROJ_KEY.endswith("." + t)) for t in targets)


def check_adapter_compatible(adapter_dir: Path) -> None:
    """A LoRA on the output projection (or a trained copy of it) would read the removed heads again: refuse it."""
    import json

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EtbenchError(f"{adapter_dir}: unreadable adapter_config.json ({one_line(err)})") from None
    if not isinstance(config, dict):
        raise EtbenchError(f"{adapter_dir}: adapter_config.json is not a JSON object")
    for key in ("target_modules", "modules_to_save"):
        if _names_o_proj(config.get(key)):
            raise EtbenchError(f"{adapter_dir}: an adapter with a kept ablation must not target o_proj ({key} "
                               f"{config.get(key)!r} includes it: its weights would read the removed heads)")
