"""A model-diffing view of a base / fine-tuned pair, at the task's positions (docs/method.md §15).

Model-diffing tools measure *that* a model changed; etbench places the change beside its circuit groups:

* **residual** (per position class, per layer): the relative difference of the residual stream after the
  layer, ``||h_ft - h_base|| / ||h_base||`` per prompt, mean over prompts with a percentile bootstrap CI;
* **heads** (per position class, per layer and head): the same for each head's ``z`` (its attention output
  before ``W_O``): the mean over prompts (no CI; there are n_layers x n_heads of them);
* **weights** (per layer, projection q/k/v/o and head): ``||ΔW_h|| / ||W_base,h||`` (Frobenius) and the rank
  of ``ΔW_h``, the head's slice of the weight change (``mech.heads.head_weight_slices``: a LoRA's delta
  counts whether merged or not). A LoRA of rank r changes every head slice with rank <= r.

The prompts are the first ``n`` items of seed ``seed``; both models read the same tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from etbench.core.errors import EtbenchError
from etbench.core.io import jsonable
from etbench.core.stats import Estimate
from etbench.mech.forward import device_of, length_batches
from etbench.mech.heads import HEAD_TENSORS, head_map, head_weight_slices
from etbench.mech.interventions import read, run
from etbench.metrics.cmap import check_compatible
from etbench.metrics.robustness import residual_estimates
from etbench.models.load import as_loaded
from etbench.schema.circuit import POSITION_CLASSES
from etbench.task import prompts
from etbench.task.layout import usable_pool

#: 2: the per-prompt residual differences the residual estimates derive from (``residual_items``).
SCHEMA_VERSION = 2
FORMAT = "etbench-model-diff"
#: Relative singular-value cut below which a direction of ΔW_h counts as zero (float32 round-off).
RANK_TOLERANCE = 1e-5


@dataclass
class ModelDiff:
    base: str
    ft: str
    n: int
    n_boxes: int
    seed: int
    residual: dict[str, list[Estimate]]  # position class -> per layer
    heads: dict[str, list[list[float]]]  # position class -> [layer][head] mean relative z difference
    weight_delta: dict[str, list[list[float]]]  # q/k/v/z -> [layer][head or KV head] relative norm
    weight_rank: dict[str, list[list[int]]]
    residual_items: dict[str, list[list[float]]]  # position class -> [layer][prompt]: what ``residual`` means

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"format": FORMAT, "schema_version": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelDiff:
        if data.get("format") != FORMAT or data.get("schema_version") != SCHEMA_VERSION:
            raise EtbenchError(f"not an {FORMAT} file of schema version {SCHEMA_VERSION}")
        try:
            return cls(str(data["base"]), str(data["ft"]), int(data["n"]), int(data["n_boxes"]), int(data["seed"]),
                       {pc: [Estimate(**e) for e in es] for pc, es in data["residual"].items()},
                       {pc: [list(map(float, r)) for r in rows] for pc, rows in data["heads"].items()},
                       {k: [list(map(float, r)) for r in rows] for k, rows in data["weight_delta"].items()},
                       {k: [list(map(int, r)) for r in rows] for k, rows in data["weight_rank"].items()},
                       {pc: [list(map(float, r)) for r in rows] for pc, rows in data["residual_items"].items()})
        except (KeyError, TypeError) as err:
            raise EtbenchError(f"malformed {FORMAT} file: {err}") from None


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||diff|| / ||ref|| over the last dimension (0 where both are 0)."""
    num, den = diff.norm(dim=-1), ref.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.where(num > 0, torch.inf, 0.0))


def model_diff(base, ft, tokenizer=None, *, n_boxes: int = 7, n: int = 50, seed: int = 0, batch_size: int = 16,
               base_name: str = "", ft_name: str = "") -> ModelDiff:
    """The diffing view of ``base`` -> ``ft`` (each a loaded model + ``tokenizer``, a ``LoadedModel`` or a
    registry ref; one tokenizer for both, as CMAP requires)."""
    if n < 2:
        raise EtbenchError(f"a model diff needs at least 2 prompts, got {n}")
    base, tokenizer, base_name = as_loaded(base, tokenizer, base_name)
    ft, ft_tok, ft_name = as_loaded(ft, tokenizer, ft_name)
    hm_b, hm_f = head_map(base), head_map(ft)
    spec = hm_b.spec
    pool, labels = usable_pool(tokenizer, n_boxes)
    examples = prompts.generate(n_boxes=n_boxes, n=n, seed=seed, objects=pool, labels=labels)
    lays = check_compatible(base, ft, tokenizer, ft_tok, examples)  # one head layout, the same token ids
    res_rel = [[[] for _ in range(spec.n_layers)] for _ in POSITION_CLASSES]  # [pc][layer] -> per item
    head_sum = torch.zeros(len(POSITION_CLASSES), spec.n_layers, spec.n_heads, dtype=torch.float64)
    for idx in length_batches((lay.length for lay in lays), batch_size):
        pos = torch.tensor([[lays[i].position(pc) for pc in POSITION_CLASSES] for i in idx])
        got = []
        for model, hm in ((base, hm_b), (ft, hm_f)):
            ids = torch.tensor([lays[i].input_ids for i in idx]).to(device_of(model))
            store: dict = {}
            with torch.no_grad():
                out = run(model, hm, {"input_ids": ids}, [read(layer, "z", store, pos) for layer in range(spec.n_layers)],
                          logits_to_keep=1, output_hidden_states=True)
            rows = torch.arange(len(idx))[:, None]
            hidden = torch.stack([h.float().cpu()[rows, pos] for h in out.hidden_states[1:]])  # [L, B, 3, D]
            z = torch.stack([store[(layer, "z")].float().cpu() for layer in range(spec.n_layers)])  # [L, B, 3, H, d]
            got.append((hidden, z))
        (hb, zb), (hf, zf) = got
        rel = _relative(hf - hb, hb)  # [L, B, 3]
        for p in range(len(POSITION_CLASSES)):
            for layer in range(spec.n_layers):
                res_rel[p][layer].extend(rel[layer, :, p].tolist())
        head_sum += _relative(zf - zb, zb).sum(dim=1).permute(1, 0, 2).double()  # [3, L, H]
    residual_items = {pc: res_rel[p] for p, pc in enumerate(POSITION_CLASSES)}
    residual = {pc: residual_estimates(rows, seed) for pc, rows in residual_items.items()}
    heads = {pc: (head_sum[p] / n).tolist() for p, pc in enumerate(POSITION_CLASSES)}
    delta: dict[str, list[list[float]]] = {}
    rank: dict[str, list[list[int]]] = {}
    for kind in HEAD_TENSORS:
        delta[kind], rank[kind] = [], []
        for layer in range(spec.n_layers):
            wb = head_weight_slices(hm_b, layer, kind).cpu()
            d = head_weight_slices(hm_f, layer, kind).cpu() - wb
            delta[kind].append(_relative(d.flatten(1), wb.flatten(1)).tolist())
            sv = torch.linalg.svdvals(d.double())  # [sites, d_head]
            scale = torch.linalg.svdvals(wb.double())[:, :1].clamp_min(1e-30)
            rank[kind].append((sv > RANK_TOLERANCE * scale).sum(-1).tolist())
    return ModelDiff(base_name, ft_name, n, n_boxes, seed, residual, heads, delta, rank, residual_items)
