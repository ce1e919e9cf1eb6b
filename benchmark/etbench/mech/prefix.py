"""Prefix reuse: many patched forward passes over one set of prompts, each computing only the tokens
its patch can change.

An edit at positions >= ``start`` leaves every token before ``start`` exactly as in the *base run*
(the prompts under the base edits: none for a clean run, "every head mean-ablated" for circuit
faithfulness). So a patched run feeds only tokens ``start..last`` with the base run's key/value cache
of ``0..start-1``: one token when every patch sits at the last position. DCM, CMAP and faithfulness
all run this way; models whose cache is not a plain per-layer key/value cache (or
``reuse_prefix=False``) run whole prompts instead, and the two paths agree to float precision
(``tests/unit/test_prefix.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from etbench.core.errors import EtbenchError
from etbench.core.progress import track
from etbench.mech.forward import device_of, forward
from etbench.mech.heads import HeadMap, head_map
from etbench.mech.interventions import Edit

#: ``edits(sub, shift)``: the edits for batch rows ``sub`` with positions shifted by ``-shift``.
EditsFn = Callable[[torch.Tensor, int], Sequence[Edit]]
T = TypeVar("T")


def start_buckets(starts: torch.Tensor, max_splits: int) -> list[tuple[torch.Tensor, int]]:
    """Rows grouped by start position: one group per distinct start, or ``max_splits`` groups of rows
    with neighbouring starts (each run from its smallest start)."""
    values = torch.unique(starts)
    if len(values) <= max_splits:
        return [((starts == v).nonzero().reshape(-1), int(v)) for v in values]
    order = torch.argsort(starts, stable=True)
    return [(chunk, int(starts[chunk].min())) for chunk in torch.tensor_split(order, max_splits) if len(chunk)]


def packed(items: Sequence[T], rows_of: Callable[[T], int], max_rows: int) -> list[list[T]]:
    """``items`` in order, cut into consecutive groups of at most ``max_rows`` rows (an item larger than that
    is a group of its own): the patched runs merged into one forward."""
    groups: list[list[T]] = []
    size = 0
    for item in items:
        if not groups or size + rows_of(item) > max_rows:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += rows_of(item)
    return groups


def predicted(logits: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """``PatchRunner.logits(reduce=predicted)``: each row's predicted token."""
    return logits.argmax(-1)


#: Cache layer classes whose keys/values can be cut to a prefix and handed back (by class name).
_REUSABLE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _kv_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) ``[B, kv_heads, T, d]`` of a dynamic cache, else None.

    Sliding-window layers (Gemma-3, Mistral) are included: the caller checks that every layer kept all
    ``T`` tokens, i.e. that the prompt is shorter than the window, and recomputes otherwise."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ not in _REUSABLE_LAYERS for layer in layers):
        return None  # static, quantised, encoder-decoder...: recompute instead
    return [(layer.keys, layer.values) for layer in layers]


def cache_fits(cache, n_tokens: int) -> bool:
    """Whether a prefix of this cache can be extended to ``n_tokens`` and cut back again: a dynamic
    cache whose sliding-window layers (if any) keep all ``n_tokens`` (transformers cannot crop a
    sliding layer once its window has filled, and a filled one has dropped the earliest tokens)."""
    if _kv_tensors(cache) is None or cache.get_seq_length() > n_tokens:
        return False
    return all(layer.sliding_window - 1 >= n_tokens for layer in cache.layers if getattr(layer, "is_sliding", False))


def _sliding_windows(cache) -> list[int | None]:
    """Each cache layer's sliding window (None for full attention), to rebuild the same layer types."""
    return [getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
            for layer in cache.layers]


@dataclass(frozen=True, eq=False)
class StoredRows:
    """Rows (indices, repeats allowed) of a runner's stored key/values, not copied yet: ``prefix_cache``
    copies just the prefix a run reads, once (a copy per row set, then another per run, was most of a
    few-token patched run's memory traffic)."""

    store: Sequence[tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor


def _prefilled_layer_class():
    """``_PrefilledLayer``, built on first use: transformers is imported lazily by this module (its import
    costs seconds and the row helpers above need none of it)."""
    global _PREFILLED
    if _PREFILLED is None:
        from transformers.cache_utils import DynamicLayer

        class _PrefilledLayer(DynamicLayer):
            """A dynamic cache layer whose keys/values were gathered at the run's full length, the first
            ``filled`` positions holding the prefix: a run's new tokens are written in place after them.
            ``DynamicLayer`` would copy the prefix twice per layer and run (filling an empty cache, then
            appending the run's tokens), most of a few-token patched run's memory traffic. Attention sees the
            same contiguous ``[B, kv_heads, T, d]`` tensors with the same values, so runs are bitwise the same;
            a run that does not end exactly at the buffer's length appends as ``DynamicLayer`` does."""

            def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
                super().__init__()
                self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
                self._full = (keys, values)
                self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]

            def update(self, key_states, value_states, *args, **kwargs):
                full_k, full_v = self._full
                start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
                if end != full_k.shape[-2] or self.keys.data_ptr() != full_k.data_ptr():
                    return super().update(key_states, value_states, *args, **kwargs)
                full_k[:, :, start:] = key_states
                full_v[:, :, start:] = value_states
                self.keys, self.values = full_k, full_v
                return full_k, full_v

        _PREFILLED = _PrefilledLayer
    return _PREFILLED


_PREFILLED = None


def _dynamic_cache(layers):
    """A ``DynamicCache`` over the given layers (its constructor would build and fill its own)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def prefix_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | StoredRows, windows: Sequence[int | None], rows,
                 start: int):
    """A ``DynamicCache`` holding tokens ``0..start-1`` of ``rows``, with the base run's layer types
    (a sliding-window layer must stay one: its mask sizes differ once the window fills). Full-attention
    layers hold the rows' whole stored length (``_PrefilledLayer``): a run over the rest of the prompt
    writes its tokens in place."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    if isinstance(kv, StoredRows):
        rows, kv = kv.rows[rows.to(kv.rows.device)], kv.store
    prefilled = _prefilled_layer_class()
    layers = []
    for (k, v), window in zip(kv, windows):
        if window is None:
            layers.append(prefilled(k[rows.to(k.device)], v[rows.to(v.device)], start))
        else:  # as DynamicCache(ddp_cache_data=...) builds a sliding layer
            layer = DynamicSlidingWindowLayer(sliding_window=window)
            layer.update(k[rows.to(k.device), :, :start], v[rows.to(v.device), :, :start])
            layers.append(layer)
    return _dynamic_cache(layers)


def extendable(cache, length: int):
    """``cache`` (a dynamic cache of a prefix) with its full-attention layers moved into buffers of ``length``
    positions (``_PrefilledLayer``): runs that extend it to ``length`` and are cropped back after each
    (path patching's suffix runs) then write their tokens in place instead of copying the prefix per run.
    Caches of other layer types are returned as they are."""
    if _kv_tensors(cache) is None:
        return cache
    prefilled = _prefilled_layer_class()
    layers = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            layers.append(layer)
            continue
        k, v = layer.keys, layer.values
        full = [x.new_empty((*x.shape[:2], length, x.shape[3])) for x in (k, v)]
        full[0][:, :, : k.shape[2]], full[1][:, :, : v.shape[2]] = k, v
        layers.append(prefilled(full[0], full[1], k.shape[2]))
    cache.layers = layers
    return cache


def sparse_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], fed: torch.Tensor):
    """A ``DynamicCache`` of the rows of ``kv`` (one per row of ``fed``) holding every position except each
    row's ``fed`` ones (``[b, P]``, ascending), in position order, and those positions ``[b, T - P]``."""
    b, p = fed.shape
    t = kv[0][0].shape[2]
    others = torch.ones(b, t, dtype=torch.bool)
    others[torch.arange(b)[:, None], fed] = False
    kept = others.nonzero()[:, 1].reshape(b, t - p)
    # the fed positions gathered after the kept ones hold the base run's values until the run writes its own
    order = torch.cat([kept, fed], dim=1)
    prefilled = _prefilled_layer_class()
    layers = []
    for k, v in kv:
        index = order.to(k.device)[:, None, :, None].expand(b, k.shape[1], t, k.shape[3])
        layers.append(prefilled(k.gather(2, index), v.gather(2, index.to(v.device)), t - p))
    return _dynamic_cache(layers), kept


def sparse_mask(kept: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """The causal mask of tokens at positions ``fed`` (``[b, P]``) over a cache of positions ``kept``
    (``[b, K]``) followed by themselves: bool ``[b, 1, P, K + P]``, True where a query attends."""
    to_cache = kept[:, None, :] < fed[:, :, None]
    to_fed = fed[:, None, :] <= fed[:, :, None]
    return torch.cat([to_cache, to_fed], dim=2)[:, None]


class PatchRunner:
    """Base forward passes over equal-length, unpadded prompts, and patched runs that reuse them.

    The base pass over all rows runs once at construction: it records each row's base argmax
    (``base_argmax``), and keeps the key/value caches when they fit in ``store_mb`` (else they are
    recomputed per batch). ``base_edits(rows)`` gives the base run's edits for those rows (row indices
    into ``input_ids``); a patched run's own edits must repeat them from ``start`` on, since the
    prefix only covers tokens before ``start``. ``counter`` (anything with ``add(input_ids)``) counts
    every forward call.
    """

    def __init__(self, model, input_ids: torch.Tensor, batch_size: int = 32, reuse_prefix: bool = True,
                 store_mb: float = 1024, progress: bool = False, description: str = "clean runs",
                 base_edits: Callable[[torch.Tensor], Sequence[Edit]] | None = None, counter=None) -> None:
        if input_ids.dim() != 2:
            raise EtbenchError("PatchRunner needs prompts of one token length (a [N, T] tensor)")
        self.model = model
        self.hm: HeadMap = head_map(model)
        self.device = device_of(model)
        self.ids = input_ids.to(self.device)
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.base_edits = base_edits
        self.counter = counter
        self.n_forward = 0  # forward passes run (base + patched), for timing reports
        self.n_tokens = 0
        n = self.ids.shape[0]
        self.base_argmax = torch.empty(n, dtype=torch.long)
        self._store: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.windows: list[int | None] = []  # per layer: the base cache's sliding window, or None
        budget = store_mb * 2**20
        chunks = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        for rows in track(chunks, description, total=len(chunks), enabled=progress):
            kv = self._base(rows)
            if kv is None:
                continue
            if rows[0] == 0:
                per_row = sum(k[:1].numel() * k.element_size() * 2 for k, _ in kv)
                if per_row * n <= budget:
                    self._store = [(torch.empty((n, *k.shape[1:]), dtype=k.dtype, device=k.device),
                                    torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=v.device)) for k, v in kv]
            if self._store is not None:
                for (sk, sv), (k, v) in zip(self._store, kv):
                    sk[rows], sv[rows] = k, v

    @torch.no_grad()
    def _base(self, rows: torch.Tensor):
        ids = self.ids[rows.to(self.device)]
        edits = self.base_edits(rows) if self.base_edits is not None else ()
        out = self._forward(ids, edits, use_cache=self.reuse_prefix)
        self.base_argmax[rows] = out.logits[:, -1].argmax(-1).cpu()
        if not self.reuse_prefix:
            return None
        if not cache_fits(out.past_key_values, ids.shape[1]):  # e.g. a sliding window dropped prompt tokens
            self.reuse_prefix = False
            return None
        kv = _kv_tensors(out.past_key_values)
        self.windows = _sliding_windows(out.past_key_values)
        return kv

    def _forward(self, ids: torch.Tensor, edits: Sequence[Edit] = (), **kwargs):
        self.n_forward += 1
        self.n_tokens += ids.numel()
        return forward(self.model, ids, self.hm, edits, counter=self.counter, **kwargs)

    def stored(self, rows: torch.Tensor):
        """``kv(rows)`` for ``prefix_cache`` only (``logits``): the stored rows, not copied, when stored."""
        if self.reuse_prefix and self._store is not None:
            return StoredRows(self._store, rows)
        distinct, inverse = torch.unique(rows, return_inverse=True)  # a repeated row is recomputed once
        kv = self.kv(distinct)
        return None if kv is None else StoredRows(kv, inverse)

    def kv(self, rows: torch.Tensor):
        """The base run's key/value cache of ``rows`` (stored, or recomputed now); None without prefix reuse."""
        if not self.reuse_prefix:
            return None
        if self._store is not None:
            # why per layer: a device_map model keeps each layer's cache on that layer's device
            return [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self._store]
        return self._base(rows)

    def logits(self, rows: torch.Tensor, kv, starts: int | torch.Tensor, edits: EditsFn,
               max_splits: int = 8, reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               ) -> torch.Tensor:
        """Last-token logits ``[B, vocab]`` of ``rows`` with edits applied. Differentiable.

        ``starts``: each row's earliest patched position (an int for all rows). Rows are run in up to
        ``max_splits`` sub-batches of similar start, each from its own start (a per-row position such as
        the structure reader's then costs about half the tokens of running every row from the earliest).
        ``edits(sub, shift)`` builds the edits for the batch rows ``sub`` (indices into ``rows``), with
        positions given as ``position - shift``. ``reduce(logits, sub)``, when given, maps each run's logits
        ``[len(sub), vocab]`` to what is returned per row (an argmax, the target's logit): only that is put
        back in row order, not the vocabulary-wide logits (and their gradient)."""
        ids = self.ids[rows.to(self.device)]
        b, t = ids.shape
        starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1).expand(b).clamp(0, t - 1)
        if reduce is None:
            reduce = lambda logits, sub: logits  # noqa: E731
        if kv is None:
            return reduce(self._forward(ids, edits(torch.arange(b), 0)).logits[:, -1].float(), torch.arange(b))
        parts, order = [], []
        for sub, start in start_buckets(starts, max_splits):
            if start == 0:
                out = self._forward(ids[sub.to(self.device)], edits(sub, 0))
            else:
                cache = prefix_cache(kv, self.windows, sub, start)
                out = self._forward(ids[sub.to(self.device), start:], edits(sub, start), past_key_values=cache,
                                    use_cache=True)
            parts.append(reduce(out.logits[:, -1].float(), sub))
            order.append(sub)
        order = torch.cat(order)
        if len(parts) == 1 and torch.equal(order, torch.arange(b)):
            return parts[0]
        # buckets come in start order (one bucket may hold rows sorted by start): back to row order
        return torch.cat(parts)[torch.argsort(order).to(parts[0].device)]

    def logits_at(self, rows: torch.Tensor, kv, fed: torch.Tensor, edits: Sequence[Edit]) -> torch.Tensor:
        """Last-token logits ``[B, vocab]`` of ``rows`` computing only the tokens at ``fed`` (``[B, P]``,
        ascending, the last position included) over the base run's key/values (``kv(rows)``) of every
        other position.

        Exact only when a patched run's other positions equal the base run's at every layer: true of a
        circuit run under mean ablation (there every head outside the kept positions outputs its mean, so a
        position's residual stream is a function of its own token alone), not of patches in a clean run.
        ``edits`` act on the ``P`` fed tokens in order."""
        ids = self.ids[rows.to(self.device)]
        fed = fed.to(torch.long)
        cache, kept = sparse_cache(kv, fed.cpu())
        mask = sparse_mask(kept, fed.cpu()).to(self.device)
        out = self._forward(ids.gather(1, fed.to(self.device)), edits, past_key_values=cache, use_cache=True,
                            position_ids=fed.to(self.device), attention_mask=mask)
        return out.logits[:, -1].float()
