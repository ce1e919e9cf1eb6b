"""Plain and edited forward passes, the one place that knows how to call a model: which device its
inputs go to, the ``logits_to_keep`` fast path (and the fallback for models without it), grouping
prompts by token length so no row is ever padded, and counting the passes an analysis makes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from etbench.mech.heads import HeadMap
from etbench.mech.interventions import Edit, run


def device_of(model) -> torch.device:
    """Where a model's inputs go: the device of its first parameter (the input embedding); the CPU for
    weights on ``meta`` (a remote model's skeleton, or accelerate's offload, whose hooks move inputs)."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def length_groups(lengths: Iterable[int]) -> list[list[int]]:
    """Indices grouped by token length, groups in order of first appearance (rows of one length need no
    padding, so positions and numerics are those of a single unpadded forward)."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return list(groups.values())


def length_batches(lengths: Iterable[int], batch_size: int) -> list[list[int]]:
    """``length_groups`` cut into batches of at most ``batch_size`` indices."""
    return [idx[s : s + batch_size] for idx in length_groups(lengths) for s in range(0, len(idx), batch_size)]


@dataclass
class PassCounter:
    """Model calls made by an analysis: ``calls`` forward passes (each over a batch), ``rows``
    sequences and ``tokens`` token positions computed (a 1-token pass on a KV cache counts 1 per
    row), ``backward`` backward passes."""

    calls: int = 0
    rows: int = 0
    tokens: int = 0
    backward: int = 0

    def add(self, input_ids: torch.Tensor) -> None:
        self.calls += 1
        self.rows += int(input_ids.shape[0])
        self.tokens += int(input_ids.numel())

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def forward(model, input_ids: torch.Tensor, hm: HeadMap | None = None, edits: Sequence[Edit] = (),
            counter: PassCounter | None = None, last_only: bool = True, **kwargs: Any):
    """One (optionally edited) forward pass; counted; ``logits_to_keep=1`` when only the last logits
    are needed (it skips the vocabulary projection everywhere else) and the model accepts it."""
    if counter is not None:
        counter.add(input_ids)
    inputs = {"input_ids": input_ids.to(device_of(model))}
    extra = {"logits_to_keep": 1} if last_only else {}
    try:  # through interventions.run even without edits: the forward backend in force (hooks or nnsight) runs it
        return run(model, hm, inputs, edits, **extra, **kwargs)
    except TypeError as err:
        if not extra or "logits_to_keep" not in str(err):
            raise
        return run(model, hm, inputs, edits, **kwargs)


@torch.no_grad()
def last_token_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits at the final position of equal-length, unpadded rows: ``[B, vocab]``."""
    return forward(model, input_ids).logits[:, -1].float()
