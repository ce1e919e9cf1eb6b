"""Patched forward passes: the only place in etbench that hooks a model.

An intervention is a list of ``Edit``s: "at layer l, on head tensor kind (z/q/k/v), for these heads at
these token positions, call fn(current values) and write back what it returns". Reading (caching),
replacing (activation patching, CMAP, mean ablation) and mixing (DCM masks) are all such edits, so
metrics describe *what* to patch and never write hooks.

Why plain torch hooks rather than nnsight traces: measured on CPU, nnsight traces give the
same speed and identical logits, while hooks compose freely (any number of edits, called from any
code, no source-capture or access-order rules), keep autograd ordinary (a mask
``Parameter`` outside the model, ``loss.backward()`` after the pass), and add no dependency. The slicing
logic lives in ``etbench.mech.heads`` and is pure tensor code, so an nnsight/NDIF backend can reuse it.

Edits on z run as a forward *pre*-hook on the attention output projection (its input is z), so the
projection itself, including a PEFT LoRA on it, still runs on the edited z. Edits on q/k/v run as a
forward hook on the projection output (after LoRA's delta is added).

Usage (positions from ``etbench.task.layout``: ``batch.positions(layouts, "last")``, shape ``[B]``)::

    hm = head_map(model)                                   # model may be a PeftModel
    src = cache(model, hm, src_inputs, [Site(15, "z", src_last, heads=[13])])[(15, "z")]   # [B, 1, d]
    out = run(model, hm, base_inputs, [replace(15, "z", src, base_last, heads=[13])])      # patched logits
    mask = torch.nn.Parameter(torch.ones(1))               # DCM: gradient flows to the mask
    out = run(model, hm, base_inputs, [mix(15, "z", src, mask, base_last, heads=[13])])
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.mech.heads import HeadMap, read_heads, write_heads

#: fn(current values) -> replacement (same shape) or None to leave them unchanged.
EditFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True, eq=False)
class Edit:
    """One read/write at (layer, kind, heads, positions). Values passed to ``fn`` are shaped like
    ``heads.read_heads`` returns them: ``[B, nh, d]`` for positions ``[B]``, ``[B, k, nh, d]`` for
    ``[B, k]``, ``[B, S, nh, d]`` for None (every position). k/v heads are KV-head indices."""

    layer: int
    kind: str
    fn: EditFn
    positions: torch.Tensor | Sequence[int] | int | None = None
    heads: Sequence[int] | None = None  # None = all heads of this kind


# ----------------------------------------------------------------------------------------------
# Edit factories


def read(layer: int, kind: str, into: dict, positions=None, heads=None, detach: bool = True, key=None) -> Edit:
    """Store the values at ``into[key]`` (default ``(layer, kind)``): only the requested positions and heads.

    For gradients with respect to a head's values (attribution patching) use an ``Edit`` whose fn
    returns ``cur + delta`` for a zero leaf ``delta``: the model is frozen, so ``cur`` has no graph."""
    return Edit(layer, kind, Reader(into, (layer, kind) if key is None else key, detach), positions, heads)


@dataclass(frozen=True, eq=False)
class Reader:
    """``read``'s edit function: stores the values it is given at ``into[key]``. A class rather than a
    closure so a backend that cannot write into the caller's dict (a remote trace: values come back
    only as results) can recognise a read and store its result there afterwards."""

    into: dict
    key: object
    detach: bool = True

    def __call__(self, cur: torch.Tensor) -> None:
        self.into[self.key] = cur.detach() if self.detach else cur


def replace(layer: int, kind: str, values: torch.Tensor, positions=None, heads=None) -> Edit:
    """Overwrite with ``values`` (activation patching, CMAP, mean ablation)."""
    return Edit(layer, kind, lambda cur: values.to(cur.device, cur.dtype).expand_as(cur), positions, heads)


def replace_where(layer: int, kind: str, values: torch.Tensor, keep: torch.Tensor, heads=None) -> Edit:
    """Overwrite every position with ``values`` except where ``keep`` (bool ``[B, S, nh]``) is true.

    Mean ablation of everything outside a circuit: ``values`` are the mean z (``[S, nh, d]`` or
    ``[B, S, nh, d]``), ``keep`` marks each circuit head at its group's position in each row."""

    def fn(cur: torch.Tensor) -> torch.Tensor:
        return torch.where(keep.to(cur.device)[..., None], cur, values.to(cur.device, cur.dtype))

    return Edit(layer, kind, fn, None, heads)


def mix(layer: int, kind: str, source: torch.Tensor, mask: torch.Tensor, positions=None, heads=None) -> Edit:
    """``x <- mask * x + (1 - mask) * source`` per head: DCM's ``z = m z_base + (1 - m) z_source``.

    ``mask`` has one entry per selected head (shape ``[nh]``), or one row of them per batch row
    (``[B, nh]``, with positions ``[B]``: several masks trained in one batch), and may require grad;
    the gradient reaches it through the rest of the forward pass."""

    def fn(cur: torch.Tensor) -> torch.Tensor:
        m = mask.to(cur.device, cur.dtype)
        m = m[..., None] if m.dim() == 2 else m.reshape(-1, 1)  # broadcasts over (B, k) and d
        return m * cur + (1 - m) * source.to(cur.device, cur.dtype)

    return Edit(layer, kind, fn, positions, heads)


# ----------------------------------------------------------------------------------------------
# Running


def apply_edits(hm: HeadMap, kind: str, x: torch.Tensor, edits: Sequence[Edit]) -> torch.Tensor | None:
    """Run ``edits`` in order on one hooked tensor; a new tensor if any wrote, else None (shared by
    the hook backend here and the nnsight backend)."""
    out, view = x, hm.view(kind, x)
    for e in edits:
        new = e.fn(read_heads(view, e.positions, e.heads))
        if new is None:
            continue
        if out is x:  # why: never write into a tensor autograd or another hook may still hold
            out = x.clone()
            view = hm.view(kind, out)
        write_heads(view, new, e.positions, e.heads)
    return None if out is x else out


@contextmanager
def applied(hm: HeadMap, edits: Sequence[Edit]) -> Iterator[None]:
    """Hooks that run ``edits`` during every forward pass inside the block (edits on one module run
    in list order, so a later edit sees an earlier one's writes)."""
    by_site: dict[tuple[int, str], list[Edit]] = defaultdict(list)
    for e in edits:
        hm.module(e.layer, e.kind)  # validates layer and kind early
        by_site[(e.layer, e.kind)].append(e)
    by_module: dict[int, list[tuple[str, list[Edit]]]] = defaultdict(list)
    modules = {}
    for (layer, kind), es in by_site.items():
        mod = hm.module(layer, kind)
        modules[id(mod)] = mod
        by_module[id(mod)].append((kind, es))  # fused q/k/v: several kinds share one module

    handles = []
    try:
        for key, sites in by_module.items():
            mod = modules[key]
            if sites[0][0] == "z":
                handles.append(mod.register_forward_pre_hook(_z_hook(hm, sites[0][1]), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(_qkv_hook(hm, sites)))
        yield
    finally:
        for h in handles:
            h.remove()


def _z_hook(hm: HeadMap, edits: Sequence[Edit]):
    def hook(module, args, kwargs):
        if args:
            new = apply_edits(hm, "z", args[0], edits)
            return None if new is None else ((new, *args[1:]), kwargs)
        name = next(iter(kwargs))  # called as proj(x=...) / proj(input=...)
        new = apply_edits(hm, "z", kwargs[name], edits)
        return None if new is None else (args, {**kwargs, name: new})

    return hook


def _qkv_hook(hm: HeadMap, sites: Sequence[tuple[str, Sequence[Edit]]]):
    def hook(module, args, output):
        out = output
        for kind, edits in sites:
            new = apply_edits(hm, kind, out, edits)
            out = out if new is None else new
        return None if out is output else out

    return hook


#: The function that runs forward passes instead of the hooks below (``forward_backend``); None = hooks.
_BACKEND: ContextVar[Callable | None] = ContextVar("etbench_forward_backend", default=None)
#: Models whose every forward pass runs through one function (``bind_runner``), whatever the backend.
_BOUND: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()


def bind_runner(model: torch.nn.Module, run_fn: Callable) -> None:
    """Every ``run`` on ``model`` calls ``run_fn`` (``forward_backend``'s signature): for a model that
    cannot run here, such as the weightless skeleton of a model hosted on NDIF."""
    _BOUND[model] = run_fn


@contextmanager
def forward_backend(run_fn: Callable | None) -> Iterator[None]:
    """Inside the block every ``run`` (and so ``cache``, prefix reuse, accuracy) calls
    ``run_fn(model, hm, inputs, edits, **forward_kwargs)``, e.g. ``etbench.nnsight_backend.run``."""
    token = _BACKEND.set(run_fn)
    try:
        yield
    finally:
        _BACKEND.reset(token)


@dataclass
class PassTally:
    """The token positions a block of work ran through models (``tallying``): ``forward_tokens`` over
    ``calls`` forward passes (every ``run``; padding included: it is computed), ``backward_tokens`` (each
    ``count_backward``: the last forward run with gradients on), and ``repeated_tokens``: forward tokens of
    unpatched rows (no edit but reads) that the outermost open tally had already run on the same model,
    with the same tokens and padding, from scratch (no KV cache): work a cache of that run would have saved."""

    calls: int = 0
    forward_tokens: int = 0
    backward_tokens: int = 0
    repeated_tokens: int = 0
    seen: set = field(default_factory=set, repr=False)
    last_grad_tokens: int = field(default=0, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "forward_tokens": self.forward_tokens, "backward_tokens": self.backward_tokens,
                "repeated_tokens": self.repeated_tokens}


#: The open tallies, outermost first (``tallying``).
_TALLIES: ContextVar[tuple[PassTally, ...]] = ContextVar("etbench_pass_tallies", default=())


@contextmanager
def tallying() -> Iterator[PassTally]:
    """Counts every forward (and ``count_backward``) inside the block; tallies nest (a stage's and its run's)."""
    tally = PassTally()
    token = _TALLIES.set(_TALLIES.get() + (tally,))
    try:
        yield tally
    finally:
        _TALLIES.reset(token)


def count_backward() -> None:
    """A backward pass through the last forward that ran with gradients on: its token positions."""
    for tally in _TALLIES.get():
        tally.backward_tokens += tally.last_grad_tokens
        tally.last_grad_tokens = 0


def _tally(model, inputs: Mapping[str, torch.Tensor], edits: Sequence[Edit], forward_kwargs) -> None:
    tallies = _TALLIES.get()
    ids = inputs.get("input_ids")
    if not tallies or ids is None:
        return
    tokens = int(ids.numel())
    repeated = 0
    if forward_kwargs.get("past_key_values") is None and all(isinstance(e.fn, Reader) for e in edits):
        mask = inputs.get("attention_mask")
        rows = ids.detach().cpu().numpy()
        masks = None if mask is None else mask.detach().cpu().numpy()
        outer = tallies[0].seen
        for i, row in enumerate(rows):
            # a row without padding runs the same with or without a mask of ones
            padded = masks is not None and not masks[i].all()
            key = hash((id(model), row.tobytes(), masks[i].tobytes() if padded else None))  # 8 bytes a row
            if key in outer:
                repeated += row.size
            outer.add(key)
    grad = torch.is_grad_enabled()
    for tally in tallies:
        tally.calls += 1
        tally.forward_tokens += tokens
        tally.repeated_tokens += repeated
        if grad:
            tally.last_grad_tokens = tokens


def run(model, hm: HeadMap | None, inputs: Mapping[str, torch.Tensor], edits: Sequence[Edit] = (), **forward_kwargs):
    """``model(**inputs, **forward_kwargs)`` with ``edits`` applied; returns the model output.
    ``hm`` may be None when there are no edits.

    Call it with the model you evaluate (a ``PeftModel`` stays a ``PeftModel``, so LoRA stays on)."""
    _tally(model, inputs, edits, forward_kwargs)
    other = _BOUND.get(model) or _BACKEND.get()
    with contiguous_projection(model, "logits_to_keep" in forward_kwargs):
        if other is not None:
            return other(model, hm, inputs, edits, **forward_kwargs)
        if not edits:
            return model(**inputs, **forward_kwargs)
        with applied(hm, edits):
            return model(**inputs, **forward_kwargs)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


@contextmanager
def contiguous_projection(model, active: bool = True) -> Iterator[None]:
    """While active, the vocabulary projection gets a contiguous input. Why: under ``logits_to_keep``
    transformers hands it the strided slice ``hidden[:, -1:]``, which torch multiplies as one
    matrix-vector product per row, reading the whole vocabulary matrix once per row (56 ms against 10 ms
    for 16 rows of a 49,152-token vocabulary on 2 CPU cores; a third of a few-token patched run). The
    logits change by float rounding only (the summation order of one product)."""
    get = getattr(model, "get_output_embeddings", None) if active else None
    projection = get() if get is not None else None
    if not isinstance(projection, torch.nn.Module):
        yield
        return
    handle = projection.register_forward_pre_hook(_contiguous_input)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True, eq=False)
class Site:
    """What to cache: one head tensor of one layer, at positions (None = every position)."""

    layer: int
    kind: str = "z"
    positions: torch.Tensor | Sequence[int] | int | None = None
    heads: Sequence[int] | None = None


@torch.no_grad()
def cache(model, hm: HeadMap, inputs: Mapping[str, torch.Tensor], sites: Sequence[Site], **forward_kwargs) -> dict:
    """One unpatched forward pass; returns ``{(layer, kind): values}`` for each site, holding only the
    requested positions and heads. Pass ``logits_to_keep=1`` to skip the full-vocabulary logits."""
    keys = [(s.layer, s.kind) for s in sites]
    if len(set(keys)) != len(keys):
        raise EtbenchError("cache: two sites share a (layer, kind); merge their heads/positions into one site")
    store: dict = {}
    run(model, hm, inputs, [read(s.layer, s.kind, store, s.positions, s.heads) for s in sites], **forward_kwargs)
    return store
