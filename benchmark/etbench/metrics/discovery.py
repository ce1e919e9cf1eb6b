"""Circuit discovery: path patching (exact) or attribution screening + exact verification (fast), then
minimality pruning. The circuit format itself is ``etbench.schema.circuit``."""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.core.io import jsonable
from etbench.core.progress import track
from etbench.mech.forward import PassCounter, forward, length_batches
from etbench.mech.heads import head_map
from etbench.mech.interventions import Edit, Site, cache, count_backward, read
from etbench.mech.interventions import replace as replace_edit
from etbench.mech.prefix import cache_fits, extendable
from etbench.metrics.ablation import AblationRunner, MeanActivations, mean_activations
from etbench.metrics.sizing import Ceilings, CircuitGrowth, ceilings, grow_circuit
from etbench.models.load import as_loaded
from etbench.schema.circuit import (
    DISCOVERY_MODES,
    GROUP_CODES,
    GROUP_POSITION,
    GROUPS,
    Circuit,
    Node,
    check_sizing,
    group_name,
)
from etbench.task import prompts
from etbench.task.counterfactuals import encode_pairs, noise_pairs
from etbench.task.layout import layouts, pad_batch, pad_id_of, usable_pool

SCHEMA_VERSION = 1

# ==============================================================================================
# Discovery: path patching (exact) and attribution screening + exact verification (fast)
# ==============================================================================================
#
# Path patching (docs/method.md §4), group by group. For a sender head s = (layer l, head h) and noise pair i:
#   step 1: run the base prompt; s's z at its group position is taken from the noise run; every other
#           head's z at the positions from the sender position to the last token is frozen to its clean
#           value, so s acts only through the residual stream and the MLPs.
#   A: p = p(answer) read from step 1 (the direct path to the logits).
#   B/C/D: step 2 reruns the base prompt with only the receivers' query (B: receivers = top A heads, at
#          the last token) or value (C: top B heads at the query label; D: top C heads at the previous
#          query label) replaced by what step 1 computed; p is read there.
#   score(s) = mean_i (p_i - p_clean_i) / p_clean_i; most negative = most important.
#
# Cost: nothing before the sender position changes, so every run restarts from a KV cache of the clean
# prompt up to the earliest sender position of the batch and computes only the remaining tokens (A and
# B: one token per run; C: three). Clean z is cached only on those positions, the noise z only at the
# sender position. A sender that sits at or above every receiver's layer cannot reach them: its score
# is exactly 0 and it is not run.
#
# Fast mode linearises both steps (attribution patching): one frozen forward + backward gives, for every
# head at once, the gradient of p (A) or of the receivers' inputs weighted by dp/d(receiver input) (B-D)
# with respect to its z; score ~ <gradient, z_noise - z_clean> / p_clean. The top candidates per group
# are then re-scored by exact path patching, and the circuit is built from those exact scores.

#: Receiver of each search: (group whose top heads receive, head tensor patched in step 2).
_RECEIVERS: dict[str, tuple[str, str] | None] = {
    "value_fetcher": None,
    "position_transmitter": ("value_fetcher", "q"),
    "position_detector": ("position_transmitter", "v"),
    "structure_reader": ("position_detector", "v"),
}
#: The paper's Llama-7B k per group (receivers passed on; candidates before pruning), out of 1024 heads.
PAPER_RECEIVER_K = {"value_fetcher": 20, "position_transmitter": 5, "position_detector": 10, "structure_reader": 5}
PAPER_CANDIDATE_K = {"value_fetcher": 58, "position_transmitter": 10, "position_detector": 25, "structure_reader": 5}
MODES = DISCOVERY_MODES
# How growth orders a group's heads: "magnitude" = exactly scored heads by |score|, then the rest by
# |attribution|; "signed" = the top-k order (most negative score first). Measured on tiny-base (sizing n 100,
# mean 500): along the signed order the faithfulness stayed at 0.21-0.30 from 27 to 714 nodes and reached
# its target (0.43) only at 726 of 1,080 nodes, when the last heads of C's order entered -- heads whose patch
# *raises* p(answer), which the signed order puts last although mean-ablating them matters.
GROWTH_ORDERS = ("magnitude", "signed")


def default_k(n_heads_total: int, paper: Mapping[str, int], minimum: int = 2) -> dict[str, int]:
    """The paper's k scaled to a model with ``n_heads_total`` heads (at least ``minimum``)."""
    return {g: max(minimum, round(paper[g] * n_heads_total / 1024)) for g in GROUPS}


def _source_position(ep, group: str) -> int:
    """Where the sender's noise z is read in the noise prompt: the same class, except for D (the noise
    query letter is usually absent from the context), which reads the noise context's label in the
    base's query segment, i.e. a random context label (docs/method.md §4)."""
    if group == "structure_reader":
        return ep.source_layout.label_positions[ep.pair.base.query_index]
    return ep.source_layout.position(GROUP_POSITION[group])


#: Which source position each group's sender reads its noise z at (see ``_source_position``).
_SOURCE_KIND = {"value_fetcher": 0, "position_transmitter": 0, "position_detector": 1, "structure_reader": 2}


class _BatchCache:
    """The passes every search over one batch of equal-length noise pairs can share.

    * one noise pass, z read at every group's source position at once (the same noise prompt for all
      four groups; reading more positions does not change the pass);
    * per position class (A and B share ``last``): the clean prefix KV cache up to the split, and the
      clean suffix run (clean z from the split on, p_clean). These are the very passes a search
      would otherwise run itself, so every score is bitwise what an unshared run gives.

    Within a fast search the attribution screen and the exact verification use the same caches (the
    screen's frozen pass is itself a clean suffix run: it provides clean z and p_clean), and across
    groups A and B use the same ones: per batch, 7 setup passes serve all four groups in exact mode,
    4 in fast mode (the unshared count is 3 per group and search, 12 exact and 20 fast)."""

    def __init__(self, model, hm, pairs, pad_id: int, prefix_cache: bool = True):
        self.model, self.hm, self.pairs, self.pad_id, self.prefix_cache = model, hm, pairs, pad_id, prefix_cache
        self.base_ids = torch.tensor([ep.base_layout.input_ids for ep in pairs])
        self.targets = torch.tensor([ep.target_id for ep in pairs])
        self._noise: list[torch.Tensor] | None = None
        self._prefix: dict[str, tuple[int, Any]] = {}
        self._clean: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def positions(self, pc: str) -> torch.Tensor:
        return torch.tensor([ep.base_layout.position(pc) for ep in self.pairs])

    @torch.no_grad()
    def noise_z(self, group: str, counter) -> list[torch.Tensor]:
        """Noise z at ``group``'s source position, per layer ``[B, H, d]``."""
        if self._noise is None:
            src = pad_batch([ep.source_layout for ep in self.pairs], self.pad_id, "right")
            spos = torch.tensor([[_source_position(ep, g) for g in ("value_fetcher", "position_detector",
                                                                    "structure_reader")] for ep in self.pairs])
            if counter is not None:
                counter.add(src.input_ids)
            dev = next(self.model.parameters()).device
            store = cache(self.model, self.hm, {"input_ids": src.input_ids.to(dev),
                                                "attention_mask": src.attention_mask.to(dev)},
                          [Site(layer, "z", spos) for layer in range(self.hm.spec.n_layers)], logits_to_keep=1)
            self._noise = [store[(layer, "z")] for layer in range(self.hm.spec.n_layers)]  # [B, 3, H, d]
        j = _SOURCE_KIND[group]
        return [z[:, j] for z in self._noise]

    @torch.no_grad()
    def prefix(self, pc: str, counter) -> tuple[int, Any]:
        """(split, KV cache of the clean prompts up to it) for position class ``pc``."""
        if pc not in self._prefix:
            split = int(self.positions(pc).min()) if self.prefix_cache else 0
            kv = None
            if split > 0:
                kv = forward(self.model, self.base_ids[:, :split], counter=counter, use_cache=True).past_key_values
                # a model without a reusable KV cache, or a sliding window shorter than the prompts: whole prompts
                if kv is None or not cache_fits(kv, self.base_ids.shape[1]):
                    split, kv = 0, None
                else:  # every suffix run extends it to the prompt's end and is cropped back
                    kv = extendable(kv, self.base_ids.shape[1])
            self._prefix[pc] = (split, kv)
        return self._prefix[pc]

    def clean(self, pc: str, run) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(clean z per layer ``[B, T, H, d]`` from the split on, p_clean ``[B]``); ``run()`` computes them."""
        if pc not in self._clean:
            self._clean[pc] = run()
        return self._clean[pc]

    def release(self, pc: str) -> None:
        """Drop the caches of position class ``pc`` (no later search needs them)."""
        self._prefix.pop(pc, None)
        self._clean.pop(pc, None)


class _SharedCaches:
    """``_BatchCache``s of every batch of ``encoded``, for searches that run over the same prompts."""

    def __init__(self, model, hm, encoded, batch_size: int, pad_id: int = 0, prefix_cache: bool = True):
        self.indices = _batch_indices(encoded, batch_size)
        self.batches = [[encoded[i] for i in idx] for idx in self.indices]
        self.caches = [_BatchCache(model, hm, b, pad_id, prefix_cache) for b in self.batches]
        self.key = (id(encoded), len(encoded), batch_size, pad_id, prefix_cache)

    def check(self, encoded, batch_size: int, pad_id: int, prefix_cache: bool) -> None:
        if self.key != (id(encoded), len(encoded), batch_size, pad_id, prefix_cache):
            raise EtbenchError("shared caches were built for other prompts or settings")

    def release(self, pc: str) -> None:
        for c in self.caches:
            c.release(pc)


class _PatchBatch:
    """Clean and noise caches of one batch of equal-length noise pairs, for one sender group (taken
    from ``shared``, a ``_BatchCache``, when given: then nothing is recomputed that it already holds)."""

    def __init__(self, model, hm, pairs, group: str, pad_id: int, counter, prefix_cache: bool = True,
                 need_clean: bool = True, shared: _BatchCache | None = None):
        self.model, self.hm, self.counter, self.group = model, hm, counter, group
        bc = shared if shared is not None else _BatchCache(model, hm, pairs, pad_id, prefix_cache)
        self.base_ids, self.targets = bc.base_ids, bc.targets
        pc = GROUP_POSITION[group]
        self.pos_s = bc.positions(pc)
        # receivers read the sender's position (B: A's query at the last token; C: B's value at the
        # query label; D: C's value at the previous query label)
        self.recv_pos = None if _RECEIVERS[group] is None else self.pos_s
        self.split, self.kv = bc.prefix(pc, counter)
        self.rel_s = self.pos_s - self.split
        self.rel_recv = None if self.recv_pos is None else self.recv_pos - self.split
        self.noise_z = bc.noise_z(group, counter)  # noise z at the sender position of each row, every layer
        self.clean_z: list[torch.Tensor] = []
        self.p_clean = None
        self._cache, self._pc = bc, pc
        if need_clean:
            self.clean_z, self.p_clean = bc.clean(pc, self._clean_run)

    @torch.no_grad()
    def _clean_run(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        into: dict = {}
        n_layers = self.hm.spec.n_layers
        logits = self.suffix([read(layer, "z", into) for layer in range(n_layers)])
        return [into[(layer, "z")] for layer in range(n_layers)], self.prob(logits)  # [B, T, H, d], [B]

    def suffix(self, edits, grad: bool = False) -> torch.Tensor:
        """Last-token logits of the base prompts under ``edits`` (positions relative to the split)."""
        ids = self.base_ids[:, self.split:]
        # why a copy under grad: cropping would leave the cache holding slices of this pass's graph
        kv = copy.deepcopy(self.kv) if grad and self.kv is not None else self.kv
        kwargs = {} if kv is None else {"past_key_values": kv, "use_cache": True}
        try:
            with torch.set_grad_enabled(grad):
                out = forward(self.model, ids, self.hm, edits, self.counter, **kwargs)
        finally:
            if self.kv is not None and not grad:
                extra = self.kv.get_seq_length() - self.split
                if extra > 0:
                    self.kv.crop(-extra)
        logits = out.logits[:, -1]
        return logits if logits.dtype == torch.float64 else logits.float()

    def prob(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1).gather(1, self.targets.to(logits.device)[:, None])[:, 0]

    # -- exact ----------------------------------------------------------------------------------

    def receivers_by_layer(self, receivers, kind: str) -> dict[int, list[int]]:
        by: dict[int, list[int]] = defaultdict(list)
        for layer, head in receivers:
            h = self.hm.spec.kv_head(head) if kind in ("k", "v") else head
            if h not in by[layer]:
                by[layer].append(h)
        return by

    @torch.no_grad()
    def sender_effect(self, layer: int, head: int, receivers=()) -> torch.Tensor | None:
        """Per-row (p - p_clean) / p_clean for one sender; None when it cannot reach any receiver."""
        recv = _RECEIVERS[self.group]
        by = {}
        if recv is not None:
            by = {m: hs for m, hs in self.receivers_by_layer(receivers, recv[1]).items() if m > layer}
            if not by:
                return None
        logits, store = self._sender_run(layer, head, by)
        if recv is not None:
            logits = self.suffix([replace_edit(m, recv[1], store[(m, recv[1])], self.rel_recv, hs)
                                  for m, hs in by.items()])
        return (self.prob(logits) - self.p_clean) / self.p_clean

    def _sender_run(self, layer: int, head: int, by: Mapping[int, list[int]]) -> tuple[torch.Tensor, dict]:
        """Step 1: the sender's z from the noise run, every head above it frozen to clean; returns the logits
        and the receivers' inputs ``{(layer, kind): [B, nh, d]}`` (heads of ``by[layer]``) it computed."""
        spec = self.hm.spec
        recv = _RECEIVERS[self.group]
        edits = [replace_edit(layer, "z", self.noise_z[layer][:, head][:, None], self.rel_s, [head])]
        edits += [replace_edit(m, "z", self.clean_z[m]) for m in range(layer + 1, spec.n_layers)]
        store: dict = {}
        if recv is not None:
            edits += [read(m, recv[1], store, self.rel_recv, hs) for m, hs in by.items()]
        return self.suffix(edits), store

    @torch.no_grad()
    def edge_effects(self, layer: int, head: int, receivers) -> dict[tuple[int, int], torch.Tensor]:
        """Per receiver site the sender can reach, per-row (p - p_clean) / p_clean when step 2 replaces *only
        that site's* input by what step 1 computed: the path sender -> this receiver alone. A site is
        (layer, query head) for q receivers and (layer, KV head) for v receivers: under grouped-query
        attention one value vector feeds every query head of its group, so no patch can separate them."""
        recv = _RECEIVERS[self.group]
        if recv is None:
            raise EtbenchError("edges of the value fetchers go to the logits: use sender_effect")
        by = {m: hs for m, hs in self.receivers_by_layer(receivers, recv[1]).items() if m > layer}
        if not by:
            return {}
        _, store = self._sender_run(layer, head, by)
        out = {}
        for m, hs in by.items():
            values = store[(m, recv[1])]  # [B, nh, d]
            for i, h in enumerate(hs):
                logits = self.suffix([replace_edit(m, recv[1], values[:, i:i + 1], self.rel_recv, [h])])
                out[(m, h)] = (self.prob(logits) - self.p_clean) / self.p_clean
        return out

    # -- attribution ----------------------------------------------------------------------------

    def attribution(self, receivers=()) -> torch.Tensor:
        """[n_layers, n_heads] summed over rows of the linearised relative effect."""
        spec = self.hm.spec
        recv = _RECEIVERS[self.group]
        B = self.base_ids.shape[0]
        T = self.base_ids.shape[1] - self.split
        dtype = self.noise_z[0].dtype
        layer_dev = self.hm.layer_devices()  # why per layer: a device_map model spreads layers over devices
        weights: dict[int, torch.Tensor] = {}
        by: dict[int, list[int]] = {}
        if recv is not None:
            by = dict(self.receivers_by_layer(receivers, recv[1]))
            deltas_r = {m: torch.zeros(B, len(hs), spec.d_head, dtype=dtype, device=layer_dev[m], requires_grad=True)
                        for m, hs in by.items()}
            # step 2 overwrites every receiver's input, so one receiver's change must not reach another
            # receiver's input: hold them all at their clean values (detach) and differentiate there
            edits = [Edit(m, recv[1], (lambda d: lambda cur: cur.detach() + d)(deltas_r[m]), self.rel_recv, hs)
                     for m, hs in by.items()]
            p = self.prob(self.suffix(edits, grad=True))
            # why autograd.grad w.r.t. the deltas only: .backward() would also compute (and keep) a
            # gradient for every weight of a model that is not frozen (13.5 GB on Llama-7B in bf16)
            grads_r = torch.autograd.grad((p / p.detach()).sum(), list(deltas_r.values()), allow_unused=True)
            count_backward()
            if self.counter is not None:
                self.counter.backward += 1
            weights = {m: torch.zeros_like(d) if g is None else g.detach()
                       for (m, d), g in zip(deltas_r.items(), grads_r)}
        deltas = [torch.zeros(B, T, spec.n_heads, spec.d_head, dtype=dtype, device=layer_dev[layer], requires_grad=True)
                  for layer in range(spec.n_layers)]
        clean: dict = {}
        edits = []
        for layer in range(spec.n_layers):
            edits.append(read(layer, "z", clean, key=("clean", layer)))
            edits.append(Edit(layer, "z", (lambda d: lambda cur: cur.detach() + d)(deltas[layer])))
        got: dict = {}
        if recv is not None:
            edits += [read(m, recv[1], got, self.rel_recv, hs, detach=False) for m, hs in by.items()]
        logits = self.suffix(edits, grad=True)
        # this pass is a clean run of the suffix (every delta is 0): its z and p(answer) are the clean
        # caches exact verification needs, so it need not rerun them (same values; a test checks)
        self._cache.clean(self._pc, lambda: ([clean[("clean", layer)] for layer in range(spec.n_layers)],
                                             self.prob(logits.detach())))
        if recv is None:
            p = self.prob(logits)
            metric = (p / p.detach()).sum()
        else:
            metric = sum((got[(m, recv[1])] * weights[m].to(got[(m, recv[1])].device, got[(m, recv[1])].dtype)).sum()
                         for m in by)
        grads: tuple[torch.Tensor | None, ...] | list[None] = [None] * spec.n_layers
        if isinstance(metric, torch.Tensor) and metric.requires_grad:
            grads = torch.autograd.grad(metric, deltas, allow_unused=True)
            count_backward()
        if self.counter is not None:
            self.counter.backward += 1
        out = torch.zeros(spec.n_layers, spec.n_heads)
        for layer in range(spec.n_layers):
            if grads[layer] is None:
                continue
            dev = layer_dev[layer]
            rows, rel_s = torch.arange(B, device=dev), self.rel_s.to(dev)
            g = grads[layer][rows, rel_s]  # [B, H, d]
            z = clean[("clean", layer)][rows, rel_s]
            out[layer] = (g * (self.noise_z[layer].to(dev) - z)).sum(-1).sum(0).float().cpu()
        return out


def _batch_indices(encoded, batch_size: int) -> list[list[int]]:
    """Indices into ``encoded`` of each batch of equal-length noise pairs."""
    return length_batches((ep.base_layout.length for ep in encoded), batch_size)


def _batches(encoded, batch_size: int):
    """Noise pairs in batches of one base-prompt length (never padded)."""
    return [[encoded[i] for i in idx] for idx in length_batches((ep.base_layout.length for ep in encoded), batch_size)]


def path_patching_scores(model, hm, encoded, group: str, receivers=(), senders=None, batch_size: int = 16,
                         pad_id: int = 0, counter=None, prefix_cache: bool = True, progress: bool = False,
                         shared: _SharedCaches | None = None, item_effects: dict | None = None):
    """Exact path-patching score of each sender: ``{(layer, head): score}`` (mean relative change of
    p(answer); 0.0 exactly for senders that cannot reach a receiver). ``shared``: caches of the same
    prompts and settings to take the clean and noise passes from (and leave them in).
    ``item_effects``: when given, filled with ``{(layer, head): [effect of item i for i in encoded order]}``
    (the per-item terms of the mean, for bootstraps over the discovery prompts)."""
    spec = hm.spec
    senders = [(layer, head) for layer in range(spec.n_layers) for head in range(spec.n_heads)] \
        if senders is None else [tuple(s) for s in senders]
    if _RECEIVERS[group] is not None and not receivers:
        raise EtbenchError(f"path patching {group} needs receiver heads (the top {_RECEIVERS[group][0]} heads)")
    sums = {s: 0.0 for s in senders}
    if shared is not None:
        shared.check(encoded, batch_size, pad_id, prefix_cache)
    indices = _batch_indices(encoded, batch_size) if shared is None else shared.indices
    batches = [[encoded[i] for i in idx] for idx in indices] if shared is None else shared.batches
    total = sum(len(b) for b in batches)
    if item_effects is not None:
        item_effects.update({s: [0.0] * total for s in senders})
    work = [(bi, s) for bi in range(len(batches)) for s in senders]
    current = (None, None)
    for bi, (layer, head) in track(work, f"path patching {GROUP_CODES[group]}", total=len(work), enabled=progress):
        if current[0] != bi:
            current = (bi, _PatchBatch(model, hm, batches[bi], group, pad_id, counter, prefix_cache,
                                       shared=None if shared is None else shared.caches[bi]))
        eff = current[1].sender_effect(layer, head, receivers)
        if eff is not None:
            sums[(layer, head)] += float(eff.sum())
            if item_effects is not None:
                for i, e in zip(indices[bi], eff.tolist()):
                    item_effects[(layer, head)][i] = e
    return {s: v / total for s, v in sums.items()}


#: Where an edge's receiver sits: the head whose input step 2 replaces (``_RECEIVERS``), by sender group.
EDGE_RECEIVERS: dict[str, tuple[str, str] | None] = dict(_RECEIVERS)

#: An edge's key: (sender (layer, head), receiver site (layer, query head for q, KV head for v)), or
#: (sender, None) for a value fetcher's direct path to the logits.
EdgeKey = tuple[tuple[int, int], "tuple[int, int] | None"]


def path_patching_edge_effects(model, hm, encoded, senders: Mapping[str, Sequence[tuple[int, int]]],
                               receivers: Mapping[str, Sequence[tuple[int, int]]], batch_size: int = 16,
                               pad_id: int = 0, counter=None, prefix_cache: bool = True,
                               progress: bool = False) -> dict[str, dict[EdgeKey, list[float]]]:
    """Per-item path-patching effects of single edges, ``{sender group: {(sender, site): [effect of item i]}}``.

    ``senders[g]``: the heads of group g whose edges are scored; ``receivers[g]``: the heads of the group g's
    search patches (B: the value fetchers, C: the position transmitters, D: the position detectors;
    ``EDGE_RECEIVERS``). An edge's effect is path patching (docs/method.md §4) with one receiver: step 1 as
    for the sender's group, step 2 replaces only that receiver site's input. A value fetcher's edge goes to
    the logits: its node score. Edges whose receiver sits at or below the sender's layer cannot carry
    anything and are left out. One noise pass and the clean passes per batch serve every group."""
    spec = hm.spec
    shared = _SharedCaches(model, hm, encoded, batch_size, pad_id, prefix_cache)
    total = sum(len(b) for b in shared.batches)
    out: dict[str, dict[EdgeKey, list[float]]] = {}
    work = [(bi, g, tuple(s)) for bi in range(len(shared.batches)) for g in GROUPS for s in senders.get(g, ())]
    batch_of: dict[tuple[int, str], _PatchBatch] = {}
    for bi, g, (layer, head) in track(work, "edge path patching", total=len(work), enabled=progress):
        if not 0 <= layer < spec.n_layers or not 0 <= head < spec.n_heads:
            raise EtbenchError(f"sender L{layer}H{head} is not a head of this model")
        key = (bi, g)
        if key not in batch_of:
            for done_bi, _ in batch_of:
                if done_bi != bi:  # why: a finished batch's clean caches are not needed again
                    for pc in set(GROUP_POSITION.values()):
                        shared.caches[done_bi].release(pc)
            batch_of.clear()
            batch_of[key] = _PatchBatch(model, hm, shared.batches[bi], g, pad_id, counter, prefix_cache,
                                        shared=shared.caches[bi])
        pb = batch_of[key]
        if EDGE_RECEIVERS[g] is None:
            effects = {None: pb.sender_effect(layer, head)}
        else:
            effects = pb.edge_effects(layer, head, [tuple(r) for r in receivers.get(g, ())])
        rows = out.setdefault(g, {})
        for site, eff in effects.items():
            per_item = rows.setdefault(((layer, head), site), [0.0] * total)
            for i, e in zip(shared.indices[bi], eff.tolist()):
                per_item[i] = e
    return out


def attribution_scores(model, hm, encoded, group: str, receivers=(), batch_size: int = 16, pad_id: int = 0,
                       counter=None, prefix_cache: bool = True, progress: bool = False,
                       shared: _SharedCaches | None = None) -> torch.Tensor:
    """Linearised path-patching score of every head: ``[n_layers, n_heads]``. ``shared`` as for
    ``path_patching_scores`` (the screen needs no clean suffix run; verification later adds it)."""
    if shared is not None:
        shared.check(encoded, batch_size, pad_id, prefix_cache)
    batches = _batches(encoded, batch_size) if shared is None else shared.batches
    total = torch.zeros(hm.spec.n_layers, hm.spec.n_heads)
    for bi, batch in enumerate(track(batches, f"attribution {GROUP_CODES[group]}", total=len(batches),
                                     enabled=progress)):
        pb = _PatchBatch(model, hm, batch, group, pad_id, counter, prefix_cache, need_clean=False,
                         shared=None if shared is None else shared.caches[bi])
        total += pb.attribution(receivers)
    return total / sum(len(b) for b in batches)


# ----------------------------------------------------------------------------------------------
# Minimality (docs/method.md §5)


def minimality(runner: AblationRunner, circuit: Circuit, mode: str = "pairs", threshold: float = 0.01,
               percentage: float = 0.3, progress: bool = False):
    """Prune ``circuit`` group by group; returns (pruned circuit, per-node records). ``runner`` evaluates
    every sub-circuit on its prompts (one runner: all evaluations share its stored all-meaned prefixes).

    F = circuit accuracy under mean ablation. For node v, K_v is a set of up to ⌈percentage·|group|⌉
    other nodes of its group; v is kept if F(C\\K_v) / F(C\\(K_v ∪ {v})) - 1 ≥ threshold.
    ``mode="pairs"`` (the paper's): partners w ranked by F(C\\{w}) - F(C\\{v,w}) (|group|²/2 evaluations),
    keeping positive ones. ``mode="single"`` (cheaper, an approximation): partners are the other nodes
    whose own removal lowers F the most (F(C) - F(C\\{w}) > 0), 3·|group| evaluations."""
    if mode not in ("pairs", "single"):
        raise EtbenchError(f"minimality mode must be 'pairs' or 'single', got {mode!r}")
    circuit.check_model(runner.hm.spec)
    memo: dict[frozenset, float] = {}

    def F(removed) -> float:
        key = frozenset(n.key for n in removed)
        if key not in memo:
            flags = runner.correct(keep=circuit.without(removed).kept())
            memo[key] = sum(flags) / len(flags)
        return memo[key]

    records = []
    kept_groups = {}
    groups = [g for g in GROUPS if circuit.groups[g]]
    for g in track(groups, "minimality", total=len(groups), enabled=progress):
        nodes = list(circuit.groups[g])
        size = max(1, math.ceil(percentage * len(nodes)))
        f_all = F([])
        single = {w.key: F([w]) for w in nodes}
        keep = []
        for v in nodes:
            others = [w for w in nodes if w.key != v.key]
            if mode == "pairs":
                gains = sorted(((single[w.key] - F([v, w]), w) for w in others), key=lambda t: -t[0])
            else:
                gains = sorted(((f_all - single[w.key], w) for w in others), key=lambda t: -t[0])
            k_v = []
            for gain, w in gains[:size]:
                if gain <= 0:
                    break
                k_v.append(w)
            f_k, f_kv = F(k_v), F(k_v + [v])
            ratio = (f_k / f_kv - 1) if f_kv > 0 else (math.inf if f_k > 0 else 0.0)
            ok = ratio >= threshold
            records.append({"group": g, "layer": v.layer, "head": v.head, "k": [[w.layer, w.head] for w in k_v],
                            "f_without_k": f_k, "f_without_k_and_v": f_kv, "kept": ok})
            if ok:
                keep.append(v)
        kept_groups[g] = keep
    return circuit.with_groups(kept_groups), records


# ----------------------------------------------------------------------------------------------
# The discovery entry point


@dataclass
class GroupSearch:
    """One group's search: scores of every head and which of them were computed exactly."""

    group: str
    receivers: list[tuple[int, int]]
    scores: list[list[float]]  # [layer][head]: exact where exact[layer][head], else attribution
    exact: list[list[bool]]
    attribution: list[list[float]] | None  # fast mode only
    ranking: list[tuple[int, int]]  # most important first
    forward_passes: dict[str, int]
    wall_s: float


@dataclass
class DiscoveryResult:
    mode: str
    model: str
    circuit: Circuit  # after minimality
    candidate: Circuit  # before minimality
    searches: dict[str, GroupSearch]
    minimality: list[dict]
    forward_passes: dict[str, Any]  # {"search": {...}, "minimality": {...}, "mean": {...}}
    wall_s: dict[str, float]
    parameters: dict[str, Any]
    # size="faithfulness": the form's ceilings on the sizing prompts, and the growth record
    ceilings: Ceilings | None = None
    growth: CircuitGrowth | None = None
    # per group, the exact per-item scores of the heads at the top of its ranking (the verified heads in
    # fast mode, as many in exact mode), in prompt order: what a bootstrap over discovery prompts re-ranks
    item_scores: dict[str, dict[tuple[int, int], list[float]]] = field(default_factory=dict)

    def item_score_rows(self) -> dict[str, list[list]]:
        """``item_scores`` as JSON: ``{group: [[layer, head, [score of item 0, 1, ...]], ...]}``."""
        # a non-finite effect (p_clean underflowed to 0) is stored as None: JSON has no NaN
        return {g: [[layer, head, [x if math.isfinite(x) else None for x in v]] for (layer, head), v in hs.items()]
                for g, hs in self.item_scores.items()}

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "schema_version": SCHEMA_VERSION, "mode": self.mode, "model": self.model,
            "circuit": self.circuit.to_dict(), "candidate": self.candidate.to_dict(),
            "searches": {g: asdict(s) for g, s in self.searches.items()}, "minimality": self.minimality,
            "forward_passes": self.forward_passes, "wall_s": self.wall_s, "parameters": self.parameters,
            "ceilings": None if self.ceilings is None else asdict(self.ceilings),
            "growth": None if self.growth is None else asdict(self.growth),
            "item_scores": self.item_score_rows(),
        })

    def ranking(self) -> list[Node]:
        """Every (group, head) node ordered by score, most negative first (for faithfulness curves)."""
        nodes = [Node(g, layer, head, s.scores[layer][head]) for g, s in self.searches.items()
                 for layer in range(len(s.scores)) for head in range(len(s.scores[layer]))]
        return sorted(nodes, key=lambda n: most_negative_first(n.score))


def most_negative_first(x: float) -> tuple[bool, float]:
    """Sort key of a score, most negative first and a non-finite one (p_clean underflowed to 0) last: a NaN key
    compares false with everything, and one NaN left the whole ranking in input order."""
    return (not math.isfinite(x), x if math.isfinite(x) else 0.0)


def magnitude_order(search: GroupSearch) -> list[tuple[int, int]]:
    """A group's heads by the size of their effect, either sign: exactly scored heads by |score|, then the
    screened rest by |attribution| (the two scores have different scales, so they are not interleaved).
    A non-finite score ranks last among its kind."""
    heads = [(layer, head) for layer, row in enumerate(search.scores) for head in range(len(row))]
    exact = [h for h in heads if search.exact[h[0]][h[1]]]
    rest = [h for h in heads if not search.exact[h[0]][h[1]]]

    def by_size(h: tuple[int, int]) -> tuple[tuple[bool, float], tuple[int, int]]:
        return most_negative_first(-abs(search.scores[h[0]][h[1]])), h

    return sorted(exact, key=by_size) + sorted(rest, key=by_size)


def _per_group(k: Mapping[str, int] | int | None) -> dict[str, int]:
    if k is None:
        return {}
    if isinstance(k, int):
        return {g: k for g in GROUPS}
    return {group_name(g): int(v) for g, v in k.items()}


def discovery_pairs(tokenizer, n_boxes: int, n: int, seed: int):
    """(usable objects, usable labels, the first ``n`` items of seed ``seed``, their encoded noise pairs): the
    prompts path patching runs on (discovery and edge scoring alike)."""
    pool, labels = usable_pool(tokenizer, n_boxes)
    examples = prompts.generate(n_boxes=n_boxes, n=n, seed=seed, objects=pool, labels=labels)
    return pool, labels, examples, encode_pairs(noise_pairs(examples, seed, pool, labels), tokenizer)


def _ablation_mean(given, model, tokenizer, hm, n_boxes, mean_n, seed, batch_size, pool, labels,
                   counter: PassCounter) -> MeanActivations:
    """The given mean (or the given function's), checked to be the one asked for; else computed."""
    if given is None:
        return mean_activations(model, tokenizer, hm, n_boxes, mean_n, seed, batch_size, pool, labels, counter=counter)
    return (given() if callable(given) else given).require(mean_n, n_boxes, seed, "discover")


#: How discovery prunes the circuit it found (``minimality``): heads in pairs (the paper), one at a time, or not.
MINIMALITY_MODES = ("pairs", "single", "none")


def check_minimality(mode: str) -> str:
    if mode not in MINIMALITY_MODES:
        raise EtbenchError(f"minimality mode must be {', '.join(MINIMALITY_MODES[:-1])} or {MINIMALITY_MODES[-1]}, "
                           f"got {mode!r}")
    return mode


def discover(model, mode: str = "fast", tokenizer=None, *, n_boxes: int = 7, n: int = 64, seed: int = 0,
             batch_size: int = 16, receiver_k: Mapping[str, int] | int | None = None,
             candidate_k: Mapping[str, int] | int | None = None, verify_k: Mapping[str, int] | int | None = None,
             minimality_mode: str | None = None, minimality_n: int = 100, mean_n: int = 100,
             threshold: float = 0.01, percentage: float = 0.3, prefix_cache: bool = True,
             size: str = "top-k", target_fraction: float = 0.9, sizing_n: int | None = None,
             growth_order: str = "magnitude", model_name: str = "", progress: bool = False,
             mean: MeanActivations | Callable[[], MeanActivations] | None = None) -> DiscoveryResult:
    """Find the four groups on ``model`` (a loaded torch model + ``tokenizer``, a ``LoadedModel``, or a
    registry ref) by path patching (``mode="exact"``) or attribution screening + exact verification of
    the top ``verify_k`` heads per group (``mode="fast"``), then prune by minimality.

    k values default to the paper's Llama-7B choices scaled to the model's head count
    (``default_k``); ``verify_k`` defaults to max(⌈1.2 × candidate_k⌉, candidate_k + 2, receiver_k + 2).
    ``minimality_mode``: "pairs" (paper; default for exact), "single" (default for fast) or "none".

    ``size``: "top-k" takes each group's top ``candidate_k`` (the paper's rule); "faithfulness" grows
    the circuit along each group's ranking (``sizing.grow_circuit``) until its faithfulness reaches
    ``target_fraction`` x the ceiling of the circuit form, both measured on ``sizing_n`` prompts
    (default ``minimality_n``) drawn from the stream of seed ``seed + 1``, so the circuit is not sized on
    the evaluation prompts of the same seed; the result carries the ceilings and the growth record.

    ``mean``: the mean activations sizing and minimality ablate with (``mean_n`` prompts of ``n_boxes``
    boxes under ``seed``), or a function returning them, called only when one of them runs; by default
    computed here. A caller that needs the same mean later (the scorecard's faithfulness) passes it in so
    it is computed once."""
    check_sizing(size, target_fraction)
    if growth_order not in GROWTH_ORDERS:
        raise EtbenchError(f"growth order must be one of {', '.join(GROWTH_ORDERS)}, got {growth_order!r}")
    if mode not in MODES:
        raise EtbenchError(f"discovery mode must be one of {', '.join(MODES)}, got {mode!r}")
    minimality_mode = check_minimality(minimality_mode or ("pairs" if mode == "exact" else "single"))
    model, tokenizer, model_name = as_loaded(model, tokenizer, model_name)
    hm = head_map(model)
    spec = hm.spec
    total_heads = spec.n_layers * spec.n_heads
    receiver_k = {**default_k(total_heads, PAPER_RECEIVER_K), **_per_group(receiver_k)}
    candidate_k = {**default_k(total_heads, PAPER_CANDIDATE_K), **_per_group(candidate_k)}
    # Verification margin, measured on tiny-base (n=32, exact reference run): the exact top-k of every
    # group sat within screen rank candidate_k + 2 (A, B, D within candidate_k; C's 7th head at rank 9),
    # so k + 1 would have lost a C head and k + 2 is the smallest margin with full recall (the same on
    # smollm2-135m-instruct, n=16: A's 15th at rank 16, C's 7th at 9); the 20%
    # proportional term keeps a margin that grows with k for large models (Llama-7B: A 58 -> 70).
    verify = {g: min(total_heads, max(math.ceil(1.2 * candidate_k[g]), candidate_k[g] + 2, receiver_k[g] + 2))
              for g in GROUPS}
    verify.update(_per_group(verify_k))
    pool, labels, examples, encoded = discovery_pairs(tokenizer, n_boxes, n, seed)
    pad_id = pad_id_of(tokenizer)

    searches: dict[str, GroupSearch] = {}
    counters = {"search": PassCounter(), "minimality": PassCounter(), "mean": PassCounter()}
    walls: dict[str, float] = {}
    t_search = time.perf_counter()
    ranked: dict[str, list[tuple[int, int]]] = {}
    item_scores: dict[str, dict[tuple[int, int], list[float]]] = {}
    # one noise pass per batch for all groups; A and B share the clean prefix/suffix passes; a fast
    # search's screen and verification share theirs. Bitwise the same scores as unshared searches.
    shared = _SharedCaches(model, hm, encoded, batch_size, pad_id, prefix_cache)
    for g in GROUPS:
        t0 = time.perf_counter()
        c = PassCounter()
        recv = _RECEIVERS[g]
        receivers = [] if recv is None else ranked[recv[0]][: receiver_k[recv[0]]]
        exact_mask = [[False] * spec.n_heads for _ in range(spec.n_layers)]
        scores = [[0.0] * spec.n_heads for _ in range(spec.n_layers)]
        attribution = None
        effects: dict[tuple[int, int], list[float]] = {}
        if mode == "exact":
            sc = path_patching_scores(model, hm, encoded, g, receivers, None, batch_size, pad_id, c, prefix_cache,
                                      progress, shared, effects)
            for (layer, head), v in sc.items():
                scores[layer][head], exact_mask[layer][head] = v, True
            order = sorted(sc, key=lambda s: most_negative_first(sc[s]))
        else:
            att = attribution_scores(model, hm, encoded, g, receivers, batch_size, pad_id, c, prefix_cache, progress,
                                     shared)
            attribution = att.tolist()
            screen = sorted(((layer, head) for layer in range(spec.n_layers) for head in range(spec.n_heads)),
                            key=lambda s: most_negative_first(attribution[s[0]][s[1]]))
            top = screen[: verify[g]]
            sc = path_patching_scores(model, hm, encoded, g, receivers, top, batch_size, pad_id, c, prefix_cache,
                                      progress, shared, effects)
            for layer, row in enumerate(attribution):
                scores[layer] = list(row)
            for (layer, head), v in sc.items():
                scores[layer][head], exact_mask[layer][head] = v, True
            order = sorted(top, key=lambda s: most_negative_first(sc[s])) + screen[verify[g]:]
        ranked[g] = order
        # the top verify[g] of the ranking: exactly the verified heads in fast mode, as many in exact mode
        item_scores[g] = {tuple(h): effects[tuple(h)] for h in order[: verify[g]]}
        searches[g] = GroupSearch(g, [tuple(r) for r in receivers], scores, exact_mask, attribution,
                                  [tuple(s) for s in order], c.as_dict(), time.perf_counter() - t0)
        for key, value in c.as_dict().items():
            setattr(counters["search"], key, getattr(counters["search"], key) + value)
        if not any(GROUP_POSITION[later] == GROUP_POSITION[g] for later in GROUPS[GROUPS.index(g) + 1:]):
            shared.release(GROUP_POSITION[g])
    del shared
    walls["search"] = time.perf_counter() - t_search

    # Candidate circuit: top candidate_k per group; A loses heads that are also B candidates (docs/method.md §4).
    # A head whose patch does not lower p(answer) (score >= 0) is never a candidate (the paper's top-k
    # would take it when a group has fewer than k harmful heads).
    cand = {g: [s for s in ranked[g][: candidate_k[g]] if searches[g].scores[s[0]][s[1]] < 0] for g in GROUPS}
    ceiling, growth = None, None
    given_mean, mean = mean, None
    if size == "faithfulness":
        t0 = time.perf_counter()
        mean = _ablation_mean(given_mean, model, tokenizer, hm, n_boxes, mean_n, seed, batch_size, pool, labels,
                              counters["mean"])
        sizing_examples = prompts.generate(n_boxes=n_boxes, n=sizing_n or minimality_n, seed=seed + 1,
                                           objects=pool, labels=labels)
        runner = AblationRunner(model, hm, layouts(sizing_examples, tokenizer), mean, batch_size,
                                counters.setdefault("sizing", PassCounter()))
        ceiling = ceilings(runner, seed)
        order = {g: ranked[g] if growth_order == "signed" else magnitude_order(searches[g]) for g in GROUPS}
        growth = grow_circuit(runner, order, ceiling=ceiling, target_fraction=target_fraction, shape=candidate_k)
        cand = {g: list(order[g][: growth.chosen[g]]) for g in GROUPS}
        walls["sizing"] = time.perf_counter() - t0
    b_set = set(cand["position_transmitter"])
    cand["value_fetcher"] = [s for s in cand["value_fetcher"] if s not in b_set]
    params = {"mode": mode, "n_boxes": n_boxes, "n": n, "seed": seed, "batch_size": batch_size,
              "receiver_k": receiver_k, "candidate_k": candidate_k, "verify_k": verify if mode == "fast" else None,
              "minimality": minimality_mode, "minimality_n": minimality_n, "mean_n": mean_n, "threshold": threshold,
              "percentage": percentage, "score": "mean relative change of p(answer), path-patched from noise prompts",
              "size": size, "target_fraction": target_fraction if size == "faithfulness" else None,
              "sizing_n": (sizing_n or minimality_n) if size == "faithfulness" else None,
              "growth_order": growth_order if size == "faithfulness" else None}
    method = "path_patching" if mode == "exact" else "attribution+path_patching"
    candidate = Circuit.from_heads(
        cand, {g: [searches[g].scores[layer][head] for layer, head in cand[g]] for g in GROUPS},
        model=model_name, n_layers=spec.n_layers, n_heads=spec.n_heads, method=method, parameters=params)

    records: list[dict] = []
    t0 = time.perf_counter()
    if minimality_mode != "none":
        if mean is None:
            mean = _ablation_mean(given_mean, model, tokenizer, hm, n_boxes, mean_n, seed, batch_size, pool, labels,
                                  counters["mean"])
        lays = layouts(examples[:minimality_n], tokenizer)
        runner = AblationRunner(model, hm, lays, mean, batch_size, counters["minimality"])
        circuit, records = minimality(runner, candidate, minimality_mode, threshold, percentage, progress)
    else:
        circuit = candidate
    walls["minimality"] = time.perf_counter() - t0
    passes = {k: v.as_dict() for k, v in counters.items()}
    passes["total_calls"] = sum(v.calls for v in counters.values())
    circuit = replace(circuit, stats={"forward_passes": passes, "wall_s": walls})
    return DiscoveryResult(mode, model_name, circuit, candidate, searches, records, passes, walls, params,
                           ceiling, growth, item_scores)


def format_discovery(res: DiscoveryResult) -> str:
    """Table: per group, the heads kept, candidates, and cost."""
    from tabulate import tabulate

    rows = []
    for g in GROUPS:
        s = res.searches[g]
        kept = ", ".join(f"L{n.layer}H{n.head}" for n in res.circuit.groups[g])
        rows.append([f"{GROUP_CODES[g]} {g}", GROUP_POSITION[g], len(res.candidate.groups[g]),
                     len(res.circuit.groups[g]), kept or "-", s.forward_passes["calls"], f"{s.wall_s:.1f}"])
    table = tabulate(rows, headers=["group", "position", "candidates", "kept", "heads", "fwd passes", "s"],
                     tablefmt="github")
    fp = res.forward_passes
    sizing = ""
    if res.growth is not None and res.ceilings is not None:
        g, c = res.growth, res.ceilings
        best = max((st.faithfulness for st in g.steps), default=float("nan"))
        sizing = (f"size by faithfulness on {c.n} held-out prompts: form ceiling {c.form_faithfulness:.3f} "
                  f"(model {c.model.value:.3f}, form {c.form_all_heads.value:.3f}, no heads {c.no_heads.value:.3f}); "
                  f"target {g.target_faithfulness:.3f} {'reached' if g.reached else 'NOT reached'} "
                  f"(best {best:.3f}) in {len(g.steps)} steps\n")
    return (f"model: {res.model}   mode: {res.mode}   circuit: {res.circuit.summary()}\n{table}\n{sizing}"
            f"forward passes: search {fp['search']['calls']} (+{fp['search']['backward']} backward), "
            f"minimality {fp['minimality']['calls']}, mean {fp['mean']['calls']}; "
            f"wall: search {res.wall_s['search']:.1f} s, minimality {res.wall_s['minimality']:.1f} s")
