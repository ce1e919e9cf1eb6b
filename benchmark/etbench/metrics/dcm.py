"""DCM, Desiderata-based Component Masking (docs/method.md §7): which heads of a circuit group carry which information.

For one circuit group (its heads, kept at the group's position class) and one desideratum (a kind of
counterfactual pair, ``etbench.task.counterfactuals``), learn one scalar ``m_h`` per head:

    z_h(base, group position) <- m_h * z_h(base) + (1 - m_h) * z_h(source, its group position)
    loss = -mean_batch logit[last, target] + lambda * sum_h (1 - m_h)

Adam, masks clamped to [0, 1] before every step, initialised at 1 (nothing patched). Every
``eval_every`` steps the mask is rounded (a head is *patched* when ``m_h <= 0.5``, i.e. torch.round's
half-to-even rule) and scored on the validation pairs (argmax over the whole vocabulary == target);
the best rounded mask wins, ties going to the one patching *more* heads (the reference's rule). The
**selected heads** are the patched heads of that mask; its test accuracy is reported with a Wilson CI.

Differences from the reference code, on purpose:

* Fully seeded: base examples, pair sampling (``desideratum_pairs``' named streams) and batch order all
  derive from ``DcmConfig.seed``.
* B5 fixed: validation (and test) positions come from the batch being evaluated.
* B1/B2 are fixed in ``etbench.task.counterfactuals``.

How it is made fast (all results are those of the plain computation; see ``PatchRunner``):

* Source activations are cached once per desideratum, only the group's heads, only at the group's
  position, only in the group's layers; one source forward serves every group.
* All (group, desideratum) masks train in lockstep on the same batch order, so each step runs **one**
  clean forward of the base batch (no gradient) and reuses its key/value cache: a patch at position p
  cannot change anything before p, so each mask's forward + backward runs only tokens p..last (one token
  for the last-position groups A and B). Autograd starts at the mask, so the backward never enters the
  layers before the first masked layer, and only the mask's gradient is computed (never the weights').
* Validation of a rounded mask already scored is not repeated (masks change rarely).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.core.progress import track
from etbench.core.stats import Proportion, proportion_ci, to_estimate
from etbench.mech.forward import device_of, length_batches
from etbench.mech.heads import HeadMap, HeadSpec, head_map
from etbench.mech.interventions import Edit, count_backward, mix, read, run
from etbench.mech.prefix import EditsFn, PatchRunner, packed, predicted, prefix_cache, start_buckets
from etbench.schema.circuit import GROUP_CODES, GROUP_POSITION, GROUPS, Circuit, Head, group_name
from etbench.schema.scorecard import DcmScore
from etbench.task.counterfactuals import (
    ADDITIONAL_DESIDERATA,
    DESIDERATA,
    MAIN_DESIDERATA,
    SOURCE_MODES,
    EncodedPair,
    desideratum_pairs,
    encode_pairs,
)
from etbench.task.layout import Layout, check_vocabulary
from etbench.task.prompts import LABELS, Example, generate

HeadsByGroup = Mapping[str, Sequence[Sequence[int]]]

#: Base examples of DCM and of the semantics check come from their own data streams, never the
#: canonical evaluation set (``generate(seed=0)``): seed s uses ``generate(seed=OFFSET + s)``.
DCM_DATA_SEED_OFFSET = 1_000_000
SEMANTICS_DATA_SEED_OFFSET = 2_000_000


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DcmConfig:
    """Everything that shapes DCM's numbers (recorded in the scorecard config)."""

    n_train: int = 1000
    n_val: int = 500
    n_test: int = 500
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.1
    lam: float = 0.01
    eval_every: int = 4  # steps between validations of the rounded mask
    seed: int = 0
    n_boxes: int = 7
    desiderata: tuple[str, ...] = MAIN_DESIDERATA
    #: groups that also get the eleven additional desiderata (the paper: Position Transmitter only)
    additional_for: tuple[str, ...] = ("position_transmitter",)
    eval_batch_size: int = 32  # batch of clean / source / validation forwards (no gradient)
    semantics_n: int = 500
    semantics_repeats: int = 10
    kv_store_mb: int = 1024  # keep clean key/value caches in memory up to this size, else recompute
    #: where a pair's source context comes from (task.counterfactuals.SOURCE_MODES): "fresh" contexts, or
    #: "dataset": another base example, whose run reuses that example's clean key/value prefix
    sources: str = "fresh"

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test", "epochs", "batch_size", "eval_every", "eval_batch_size",
                     "semantics_n", "semantics_repeats"):
            if getattr(self, name) < 1:
                raise EtbenchError(f"DCM {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.lam < 0:
            raise EtbenchError(f"DCM needs lr > 0 and lam >= 0, got lr {self.lr}, lam {self.lam}")
        for d in self.desiderata:
            if d not in DESIDERATA:
                raise EtbenchError(f"unknown desideratum {d!r}; known: {', '.join(DESIDERATA)}")
        for g in self.additional_for:
            group_name(g)
        if self.sources not in SOURCE_MODES:
            raise EtbenchError(f"DCM sources must be one of {', '.join(SOURCE_MODES)}, got {self.sources!r}")
        if self.sources == "dataset" and (set(self.desiderata) - set(MAIN_DESIDERATA) or self.additional_for):
            raise EtbenchError("DCM dataset sources are for the main desiderata only (no additional_for)")

    @property
    def steps(self) -> int:
        """Optimiser steps: epochs x batches per epoch."""
        return self.epochs * -(-self.n_train // self.batch_size)

    def desiderata_for(self, group: str) -> tuple[str, ...]:
        extra = ADDITIONAL_DESIDERATA if group_name(group) in {group_name(g) for g in self.additional_for} else ()
        return tuple(dict.fromkeys(self.desiderata + extra))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["sources"] == "fresh":
            # a field added after scorecards were recorded: its default is left out, so their DCM settings
            # (checked by ``submit``) and stage keys stay those of the same protocol
            del out["sources"]
        return out


#: ``paper``: the reference's sizes and hyper-parameters. ``quick``: a CPU-size preset (the three main
#: desiderata, 2 epochs of 64 pairs in batches of 8, 32/32 validation/test pairs, 3 semantics repeats
#: of 32). Why 16 steps: Adam moves a mask by about ``lr`` per step, so from 1 it needs > 5 steps at
#: lr 0.1 to round to "patched"; the first quick preset (4 steps) could never select a head, and did not.
DCM_PRESETS: dict[str, DcmConfig] = {
    "paper": DcmConfig(),
    "quick": DcmConfig(n_train=64, n_val=32, n_test=32, epochs=2, batch_size=8, eval_every=2, additional_for=(),
                       eval_batch_size=32, semantics_n=32, semantics_repeats=3),
    # quick's sizes with each source taken from another base example (the reference's "another line of the
    # dataset"): its run reuses that example's clean key/values and computes the last few tokens, where a fresh
    # context costs a whole prompt. The sources were 45% of quick's DCM and ~90% of its semantics check.
    "quick-dataset": DcmConfig(n_train=64, n_val=32, n_test=32, epochs=2, batch_size=8, eval_every=2,
                               additional_for=(), eval_batch_size=32, semantics_n=32, semantics_repeats=3,
                               sources="dataset"),
}


def dcm_preset(name: str, **changes) -> DcmConfig:
    """A named DCM configuration, with ``changes`` applied (e.g. ``seed``)."""
    if name not in DCM_PRESETS:
        raise EtbenchError(f"unknown DCM preset {name!r}; known: {', '.join(DCM_PRESETS)}")
    return dataclasses.replace(DCM_PRESETS[name], **changes)


# ----------------------------------------------------------------------------------------------
# Heads per group


def normalise_heads(heads: Circuit | HeadsByGroup) -> dict[str, tuple[Head, ...]]:
    """``{group name: ((layer, head), ...)}`` from a ``Circuit`` or a mapping (groups by name or letter).

    Always fresh tuples, so no caller's list is ever extended in place (the reference's bug B7)."""
    if isinstance(heads, Circuit):
        return {g: tuple(heads.heads(g)) for g in GROUPS if heads.heads(g)}
    if not isinstance(heads, Mapping):
        raise EtbenchError(f"heads must be a Circuit or a mapping group -> [(layer, head), ...], got {type(heads).__name__}")
    out: dict[str, tuple[Head, ...]] = {}
    for g, hs in heads.items():
        name = group_name(g)
        if name in out:
            raise EtbenchError(f"group {name} given twice")
        pairs = []
        for p in hs:
            p = tuple(p)
            if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p):
                raise EtbenchError(f"group {name}: a head must be (layer, head) non-negative integers, got {p!r}")
            pairs.append((int(p[0]), int(p[1])))
        if len(set(pairs)) != len(pairs):
            raise EtbenchError(f"group {name} lists a head twice")
        out[name] = tuple(pairs)
    return out


def check_heads_fit(heads: Mapping[str, Sequence[Head]], spec: HeadSpec, what: str = "this model") -> None:
    bad = [(g, l, h) for g, hs in heads.items() for l, h in hs if l >= spec.n_layers or h >= spec.n_heads]
    if bad:
        shown = ", ".join(f"{GROUP_CODES[g]}:L{l}H{h}" for g, l, h in bad[:5])
        raise EtbenchError(f"heads do not fit {what} ({spec.n_layers} layers x {spec.n_heads} heads): {shown}")


def by_layer(heads: Sequence[Head]) -> list[tuple[int, list[int], list[int]]]:
    """``[(layer, [column in heads], [head index])]`` in layer order."""
    layers: dict[int, tuple[list[int], list[int]]] = {}
    for col, (layer, head) in enumerate(heads):
        cols, hs = layers.setdefault(layer, ([], []))
        cols.append(col)
        hs.append(head)
    return [(layer, cols, hs) for layer, (cols, hs) in sorted(layers.items())]


def format_heads(heads: Sequence[Head]) -> str:
    return " ".join(f"L{l}H{h}" for l, h in heads) or "-"


# ----------------------------------------------------------------------------------------------
# Patched forward passes that reuse a clean run's key/value cache


class _Stop(Exception):
    """Raised by the last read of a caching pass: the rest of the forward is not needed."""


def _stop(cur: torch.Tensor) -> None:
    raise _Stop


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two prompts share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def cache_at_positions(model, hm: HeadMap, lays: Sequence[Layout], heads: Mapping[str, Sequence[Head]],
                       kind: str = "z", batch_size: int = 32, positions: Mapping[str, str] | None = None,
                       prefix: tuple[PatchRunner, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """One forward per batch of prompts; ``{group: [N, n_heads_of_group, d]}``: each group's heads at its
    own position class in each prompt (``positions`` overrides ``GROUP_POSITION``), nothing else kept.
    Prompts of different token lengths are batched separately (never padded). The forward stops after
    the last layer read (layers above it, and the logits, are never computed).

    ``prefix = (runner, donors)``: prompt i begins like the runner's base prompt ``donors[i]`` (a dataset
    source and its partner example), so it is fed only from the first token that differs (or from its
    first read position, if that is earlier) over that base run's key/values: the numbers of a whole
    forward to float precision, for a few tokens' work when only the query differs."""
    positions = dict(GROUP_POSITION, **(positions or {}))
    device = device_of(model)
    n = len(lays)
    out = {g: torch.empty((n, len(hs), hm.spec.d_head)) for g, hs in heads.items() if hs}
    if not out:  # nothing to read: no forward (a selection with no heads once ran a whole one for nothing)
        return out
    runner = prefix[0] if prefix is not None and prefix[0].reuse_prefix else None
    for rows in length_batches((lay.length for lay in lays), batch_size):
        ids = torch.tensor([lays[i].input_ids for i in rows], device=device)
        pos = {g: torch.tensor([lays[i].position(positions[g]) for i in rows]) for g in out}
        if runner is None:
            buckets, kv = [(torch.arange(len(rows)), 0)], None
        else:
            donors = [prefix[1][i] for i in rows]
            base_ids = runner.ids[torch.tensor(donors, device=runner.ids.device)].tolist()
            shared = torch.tensor([common_prefix(lays[i].input_ids, b) for i, b in zip(rows, base_ids)])
            starts = torch.minimum(shared, torch.stack(list(pos.values())).min(0).values)
            kv = runner.stored(torch.tensor(donors))
            buckets = [(torch.arange(len(rows)), 0)] if kv is None else start_buckets(starts, max_splits=4)
        for sub, start in buckets:
            store: dict = {}
            edits = [read(layer, kind, store, (pos[g][sub] - start).to(device), hs, key=(g, layer))
                     for g in out for layer, _, hs in by_layer(heads[g])]
            if edits:  # nothing after the last layer read is needed: stop the forward there
                edits.append(Edit(max(e.layer for e in edits), kind, _stop))
            extra = {} if start == 0 else {"past_key_values": prefix_cache(kv, runner.windows, sub, start),
                                           "use_cache": True}
            try:
                run(model, hm, {"input_ids": ids[sub.to(device), start:]}, edits, **extra)
            except _Stop:
                pass
            r = torch.tensor(rows)[sub]
            for g in out:
                for layer, cols, _ in by_layer(heads[g]):
                    out[g][r[:, None], torch.tensor(cols)[None, :]] = store[(g, layer)].float().cpu()
    return out


def _mix_edits(heads: Sequence[Head], source: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> EditsFn:
    """Edits of ``z <- m z + (1 - m) source`` for one group: source ``[B, n, d]``, mask ``[n]`` (or one
    per row, ``[B, n]``), pos ``[B]``."""
    layers = by_layer(heads)

    def make(sub: torch.Tensor, shift: int) -> list[Edit]:
        p, src = pos[sub.to(pos.device)] - shift, source[sub.to(source.device)]
        m = mask[sub.to(mask.device)] if mask.dim() == 2 else mask
        return [mix(layer, "z", src[:, cols], m[..., cols], p, hs) for layer, cols, hs in layers]

    return make


# ----------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class PairSet:
    """Encoded pairs of one desideratum over the shared base examples."""

    desideratum: str
    pairs: tuple[EncodedPair, ...]
    targets: torch.Tensor  # [N] target token ids


def dcm_examples(tokenizer, n: int, n_boxes: int = 7, seed: int = 0,
                 offset: int = DCM_DATA_SEED_OFFSET) -> tuple[list[Example], tuple[str, ...] | None, tuple[str, ...]]:
    """Seeded base examples from the objects/labels this tokenizer spells as single tokens;
    returns (examples, object pool or None for all, label pool) for ``desideratum_pairs``."""
    report = check_vocabulary(tokenizer)
    report.require(n_boxes)
    pool = report.kept_objects if report.dropped_objects else None
    labels = report.kept_labels if report.dropped_labels else LABELS
    return generate(n_boxes=n_boxes, n=n, seed=offset + seed, objects=pool, labels=labels), pool, labels


def make_pair_sets(tokenizer, examples: Sequence[Example], desiderata: Sequence[str], seed: int,
                   objects=None, labels=LABELS, sources: str = "fresh") -> dict[str, PairSet]:
    out = {}
    for d in desiderata:
        enc = encode_pairs(desideratum_pairs(d, examples, seed=seed, objects=objects, labels=labels, sources=sources),
                           tokenizer)
        out[d] = PairSet(d, tuple(enc), torch.tensor([p.target_id for p in enc], dtype=torch.long))
    return out


def _base_ids(pair_sets: Mapping[str, PairSet]) -> tuple[torch.Tensor, list[Layout]]:
    first = next(iter(pair_sets.values()))
    lays = [p.base_layout for p in first.pairs]
    lengths = {lay.length for lay in lays}
    if len(lengths) != 1:
        raise EtbenchError(f"base prompts must share one token length, got lengths {sorted(lengths)}")
    for ps in pair_sets.values():
        if [p.base_layout.input_ids for p in ps.pairs] != [lay.input_ids for lay in lays]:
            raise EtbenchError("desiderata were built on different base examples")
    return torch.tensor([lay.input_ids for lay in lays], dtype=torch.long), lays


def _group_positions(lays: Sequence[Layout], groups: Sequence[str]) -> dict[str, torch.Tensor]:
    return {g: torch.tensor([lay.position(GROUP_POSITION[g]) for lay in lays], dtype=torch.long) for g in groups}


def _source_values(model, hm: HeadMap, pair_set: PairSet, heads: Mapping[str, Sequence[Head]], batch_size: int,
                   runner: PatchRunner) -> dict[str, torch.Tensor]:
    """The heads' values at their positions in each pair's source run; dataset sources (pairs with a
    ``source_row``) reuse their partner's clean run in ``runner`` (built on the pair set's base prompts)."""
    rows = [p.pair.source_row for p in pair_set.pairs]
    prefix = (runner, rows) if all(r is not None for r in rows) else None
    # a source fed over its partner's key/values is a few tokens a row: batch as many rows as a merged evaluation
    rows_per_batch = batch_size * (MERGED_BATCHES if prefix is not None else 1)
    return cache_at_positions(model, hm, [p.source_layout for p in pair_set.pairs], heads, batch_size=rows_per_batch,
                              prefix=prefix)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class MaskResult:
    """One group x desideratum: the learned mask and the best rounded mask's heads and accuracies."""

    group: str
    desideratum: str
    heads: tuple[Head, ...]  # the group's heads, in mask order
    mask: tuple[float, ...]  # the final continuous mask (1 = base kept, 0 = source patched)
    selected: tuple[Head, ...]  # heads patched by the best rounded mask = DCM's answer
    val_accuracy: float
    test: Proportion
    test_correct: tuple[bool, ...]
    history: tuple[tuple[int, int, float], ...]  # (step, heads patched, validation accuracy) per validation

    def score(self, circuit: str) -> "DcmScore":
        return DcmScore(circuit=circuit, group=self.group, desideratum=self.desideratum,
                        selected_heads=[[l, h] for l, h in self.selected], test_accuracy=to_estimate(self.test))


@dataclass
class DcmResult:
    model: str
    config: DcmConfig
    masks: list[MaskResult]
    timings: dict[str, float] = field(default_factory=dict)

    def get(self, group: str, desideratum: str) -> MaskResult:
        g = group_name(group)
        for m in self.masks:
            if m.group == g and m.desideratum == desideratum:
                return m
        raise EtbenchError(f"no DCM result for {g} x {desideratum}")

    def selected(self, group: str, desideratum: str) -> tuple[Head, ...]:
        return self.get(group, desideratum).selected

    def selections(self) -> dict[tuple[str, str], tuple[Head, ...]]:
        return {(m.group, m.desideratum): m.selected for m in self.masks}

    def scores(self, circuit: str) -> list["DcmScore"]:
        return [m.score(circuit) for m in self.masks]

    def item_rows(self, circuit: str = "") -> list[dict[str, Any]]:
        return [{"measure": "dcm_test", "model": self.model, "circuit": circuit, "group": m.group,
                 "desideratum": m.desideratum, "item": i, "correct": bool(c)}
                for m in self.masks for i, c in enumerate(m.test_correct)]


# ----------------------------------------------------------------------------------------------
# Training


def _rounded(mask: torch.Tensor) -> tuple[bool, ...]:
    """True = patched (torch.round sends m <= 0.5 to 0)."""
    return tuple(bool(x) for x in (mask.detach().clamp(0, 1) <= 0.5).tolist())


#: A patched evaluation run feeds a few tokens a row over stored key/values, so its cost is reading the weights,
#: not the rows: ``_evaluate`` merges the patched jobs of up to this many batches' rows into one forward.
MERGED_BATCHES = 8


def _evaluate(runner: PatchRunner, rows: torch.Tensor, jobs: Sequence[tuple[Any, Sequence[Head], Sequence[bool],
              torch.Tensor, torch.Tensor, torch.Tensor]], batch_size: int) -> dict[Any, list[bool]]:
    """Correct/incorrect per row for several hard masks at once.

    ``jobs``: (key, heads, patched flags, source [N, n, d], positions [N], targets [N]) over all rows. A job
    that patches nothing is the clean run's prediction. The patched jobs' rows run together, up to
    ``MERGED_BATCHES x batch_size`` rows a forward: each row gets its own job's sources through a 0/1 mix over
    the union of the merged jobs' heads (exactly the source where 0, exactly the run's own value where 1)."""
    results: dict[Any, list[bool]] = {key: [] for key, *_ in jobs}
    units = []  # (job, rows) in job order, then row order: each job's results come back in row order
    for job in jobs:
        key, _, patched, _, _, targets = job
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            if any(patched):
                units.append((job, chunk))
            else:
                results[key] += (runner.base_argmax[chunk] == targets[chunk]).tolist()
    for group in packed(units, lambda unit: len(unit[1]), MERGED_BATCHES * batch_size):
        union = list(dict.fromkeys(h for (_, heads, patched, *_), _ in group
                                   for h, p in zip(heads, patched) if p))
        column = {h: i for i, h in enumerate(union)}
        all_rows = torch.cat([chunk for _, chunk in group])
        values = torch.zeros((len(all_rows), len(union), group[0][0][3].shape[-1]))
        keep = torch.ones((len(all_rows), len(union)))
        pos = torch.empty(len(all_rows), dtype=torch.long)
        at = 0
        for (_, heads, patched, source, positions, _), chunk in group:
            end = at + len(chunk)
            cols = [column[h] for h, p in zip(heads, patched) if p]
            src = source[chunk][:, [i for i, p in enumerate(patched) if p]]
            values[at:end, cols] = src.float()
            keep[at:end, cols] = 0.0
            pos[at:end] = positions[chunk]
            at = end
        with torch.no_grad():
            pred = runner.logits(all_rows, runner.stored(all_rows), pos,
                                 _mix_edits(union, values.to(runner.device), keep.to(runner.device),
                                            pos.to(runner.device)), reduce=predicted).cpu()
        at = 0
        for (key, *_, targets), chunk in group:
            results[key] += (pred[at : at + len(chunk)] == targets[chunk]).tolist()
            at += len(chunk)
    return results


def train_masks(model, tokenizer, heads: Circuit | HeadsByGroup, config: DcmConfig | str = "quick", *,
                groups: Sequence[str] | None = None, model_name: str = "", progress: bool = False,
                reuse_prefix: bool = True) -> DcmResult:
    """Learn a DCM mask for every group x desideratum (``config.desiderata_for(group)``) on ``model``.

    ``heads``: a ``Circuit`` or ``{group: [(layer, head), ...]}`` (e.g. the model's own circuit).
    Base examples: ``n_train + n_val + n_test`` from the seeded DCM data stream, split in that order;
    pairs: ``desideratum_pairs(d, examples, seed=config.seed)``. Returns the selected heads and test
    accuracy of each mask, plus timings (``step_s``: one lockstep step over all masks; ``mask_step_s``:
    per mask)."""
    cfg = dcm_preset(config) if isinstance(config, str) else config
    t0 = time.perf_counter()
    hbg = _select_groups(normalise_heads(heads), groups)
    tasks = [(g, d) for g in hbg for d in cfg.desiderata_for(g)]
    desiderata = list(dict.fromkeys(d for _, d in tasks))
    n_total = cfg.n_train + cfg.n_val + cfg.n_test
    examples, pool, labels = dcm_examples(tokenizer, n_total, cfg.n_boxes, cfg.seed)
    pair_sets = make_pair_sets(tokenizer, examples, desiderata, cfg.seed, pool, labels, cfg.sources)
    result = fit_masks(model, hbg, pair_sets, cfg, tasks=tasks, model_name=model_name, progress=progress,
                       reuse_prefix=reuse_prefix)
    total = time.perf_counter() - t0
    result.timings["pairs_s"] = total - result.timings["total_s"]  # building and tokenizing the pairs
    result.timings["total_s"] = total
    return result


def _select_groups(hbg: dict[str, tuple[Head, ...]], groups: Sequence[str] | None) -> dict[str, tuple[Head, ...]]:
    if groups is not None:
        wanted = [group_name(g) for g in groups]
        hbg = {g: hbg[g] for g in wanted if g in hbg}
    hbg = {g: hs for g, hs in hbg.items() if hs}
    if not hbg:
        raise EtbenchError("DCM needs at least one group with heads")
    return hbg


def fit_masks(model, heads: Circuit | HeadsByGroup, pair_sets: Mapping[str, PairSet], config: DcmConfig, *,
              tasks: Sequence[tuple[str, str]] | None = None, model_name: str = "", progress: bool = False,
              reuse_prefix: bool = True) -> DcmResult:
    """DCM on given pair sets (one per desideratum, all over the same base examples): rows
    ``[0, n_train)`` train, the next ``n_val`` validate, the next ``n_test`` test. ``tasks`` defaults to
    every group x every pair set. ``train_masks`` builds the pair sets; tests plant their own."""
    cfg = config
    t0 = time.perf_counter()
    hbg = _select_groups(normalise_heads(heads), None)
    tasks = list(tasks) if tasks is not None else [(g, d) for g in hbg for d in pair_sets]
    for g, d in tasks:
        if g not in hbg or d not in pair_sets:
            raise EtbenchError(f"DCM task {g} x {d}: no heads for the group or no pairs for the desideratum")
    hm = head_map(model)
    check_heads_fit(hbg, hm.spec, model_name or "the model")
    desiderata = list(dict.fromkeys(d for _, d in tasks))
    pair_sets = {d: pair_sets[d] for d in desiderata}
    n_total = cfg.n_train + cfg.n_val + cfg.n_test
    for d, ps in pair_sets.items():
        if len(ps.pairs) != n_total:
            raise EtbenchError(f"desideratum {d}: {len(ps.pairs)} pairs, config needs {n_total} "
                               f"({cfg.n_train} train + {cfg.n_val} val + {cfg.n_test} test)")
    ids, lays = _base_ids(pair_sets)
    pos = _group_positions(lays, list(hbg))
    train = torch.arange(cfg.n_train)
    val = torch.arange(cfg.n_train, cfg.n_train + cfg.n_val)
    test = torch.arange(cfg.n_train + cfg.n_val, n_total)

    t_clean = time.perf_counter()
    # the clean runs first: a dataset source's run reuses its partner's clean key/value prefix
    runner = PatchRunner(model, ids, cfg.eval_batch_size, reuse_prefix, cfg.kv_store_mb, progress, "DCM clean runs")
    t_src = time.perf_counter()
    sources: dict[tuple[str, str], torch.Tensor] = {}
    for d in track(desiderata, "DCM sources", total=len(desiderata), enabled=progress):
        need = {g: hbg[g] for g, dd in tasks if dd == d}
        for g, values in _source_values(model, hm, pair_sets[d], need, cfg.eval_batch_size, runner).items():
            sources[(g, d)] = values
    t_train = time.perf_counter()

    device = runner.device
    gen = torch.Generator().manual_seed(cfg.seed)
    masks = {t: torch.nn.Parameter(torch.ones(len(hbg[t[0]]), device=device)) for t in tasks}
    opts = {t: torch.optim.Adam([masks[t]], lr=cfg.lr) for t in tasks}
    memo: dict[tuple[Any, tuple[bool, ...]], float] = {}
    best: dict[Any, tuple[float, int, tuple[bool, ...]]] = {}
    history: dict[Any, list[tuple[int, int, float]]] = {t: [] for t in tasks}

    def validate(step: int) -> None:
        jobs = []
        for t in tasks:
            r = _rounded(masks[t])
            if (t, r) not in memo:
                g, d = t
                jobs.append(((t, r), hbg[g], r, sources[t], pos[g], pair_sets[d].targets))
        for key, correct in _evaluate(runner, val, jobs, cfg.eval_batch_size).items():
            memo[key] = sum(correct) / len(correct)
        for t in tasks:
            r = _rounded(masks[t])
            acc, n_sel = memo[(t, r)], sum(r)
            history[t].append((step, n_sel, acc))
            if t not in best or acc > best[t][0] or (acc == best[t][0] and n_sel > best[t][1]):
                best[t] = (acc, n_sel, r)

    batches = [perm[s : s + cfg.batch_size] for _ in range(cfg.epochs)
               for perm in [train[torch.randperm(cfg.n_train, generator=gen)]]
               for s in range(0, cfg.n_train, cfg.batch_size)]
    # Every mask trains in one forward + backward a step: the batch is repeated once per mask, each copy with
    # its own mask and sources over the union of the groups' heads (1 = the run's own value elsewhere). Rows
    # never interact, so the summed loss gives each mask exactly the gradient of its own loss; a few-token
    # patched run costs a read of the weights, so one run of k copies costs little more than one of a copy.
    union = list(dict.fromkeys(h for g, _ in tasks for h in hbg[g]))
    columns = {g: torch.tensor([union.index(h) for h in hbg[g]], device=device) for g in hbg}
    d_head = next(iter(sources.values())).shape[-1]
    k = len(tasks)
    step_times = []
    for step, rows in enumerate(track(batches, "DCM masks", total=len(batches), enabled=progress), start=1):
        ts = time.perf_counter()
        b = len(rows)
        with torch.no_grad():
            for t in tasks:
                masks[t].clamp_(0, 1)
        p = torch.cat([pos[g][rows] for g, _ in tasks])
        ones = torch.ones(len(union), device=device)
        mask_rows = torch.stack([ones.index_put((columns[g],), masks[(g, d)]) for g, d in tasks]).repeat_interleave(b, 0)
        src = torch.zeros((k * b, len(union), d_head))
        for i, (g, d) in enumerate(tasks):
            src[i * b : (i + 1) * b, columns[g].cpu()] = sources[(g, d)][rows]
        kv_k = runner.stored(rows.repeat(k))
        tgt = torch.cat([pair_sets[d].targets[rows] for _, d in tasks])

        def target_logit(logits: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
            # logits come from the last layer's device (a device_map model), the masks live on the first's
            return logits.gather(1, tgt[sub].to(logits.device)[:, None])[:, 0]

        picked = runner.logits(rows.repeat(k), kv_k, p, _mix_edits(union, src.to(device), mask_rows, p.to(device)),
                               reduce=target_logit).reshape(k, b)
        loss = sum(-picked[i].mean() + cfg.lam * (1 - masks[t]).sum().to(picked.device) for i, t in enumerate(tasks))
        # why autograd.grad: the caller's model may not be frozen; .backward() would also compute
        # (and keep) gradients for every weight after the first masked layer.
        grads = torch.autograd.grad(loss, [masks[t] for t in tasks])
        count_backward()
        for t, grad in zip(tasks, grads):
            masks[t].grad = grad
            opts[t].step()
        step_times.append(time.perf_counter() - ts)
        if step % cfg.eval_every == 0 or step == len(batches):
            validate(step)
    t_test = time.perf_counter()

    jobs = [(t, hbg[t[0]], best[t][2], sources[t], pos[t[0]], pair_sets[t[1]].targets) for t in tasks]
    test_correct = _evaluate(runner, test, jobs, cfg.eval_batch_size)
    results = []
    for t in tasks:
        g, d = t
        acc, _, r = best[t]
        correct = test_correct[t]
        results.append(MaskResult(
            group=g, desideratum=d, heads=hbg[g], mask=tuple(float(x) for x in masks[t].detach().clamp(0, 1).cpu()),
            selected=tuple(h for h, patched in zip(hbg[g], r) if patched), val_accuracy=acc,
            test=proportion_ci(sum(correct), len(correct)), test_correct=tuple(correct), history=tuple(history[t])))
    t_end = time.perf_counter()
    timings = {
        "total_s": t_end - t0, "sources_s": t_train - t_src, "clean_s": t_src - t_clean,
        "train_s": t_test - t_train, "test_s": t_end - t_test, "steps": len(step_times),
        "step_s": statistics.mean(step_times) if step_times else 0.0,
        "mask_step_s": (statistics.mean(step_times) / len(tasks)) if step_times else 0.0,
        "n_masks": len(tasks), "forward_passes": runner.n_forward, "prefix_reuse": float(runner.reuse_prefix),
        "source_forwards": float(sum(-(-len(pair_sets[d].pairs) // cfg.eval_batch_size) for d in desiderata)),
    }
    return DcmResult(model=model_name, config=cfg, masks=results, timings=timings)


def run_group(model, tokenizer, group: str, heads: Sequence[Sequence[int]], desideratum: str,
              config: DcmConfig | str = "quick", **kwargs) -> MaskResult:
    """DCM for one group x one desideratum (see ``train_masks``)."""
    cfg = dcm_preset(config) if isinstance(config, str) else config
    from dataclasses import replace as _replace

    cfg = _replace(cfg, desiderata=(desideratum,), additional_for=())
    return train_masks(model, tokenizer, {group: heads}, cfg, **kwargs).masks[0]


# ----------------------------------------------------------------------------------------------
# Cross-model semantics check


@dataclass(frozen=True)
class SemanticsResult:
    """Accuracy against a desideratum's target when a group's DCM heads are patched from fresh sources."""

    model: str
    group: str
    desideratum: str
    heads: tuple[Head, ...]
    accuracies: tuple[float, ...]  # one per repeat (fresh seeded sources, same base examples)
    n: int  # pairs per repeat
    correct: tuple[tuple[bool, ...], ...] = ()  # per repeat, per pair: the rows a published check is re-derived from

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def semantics_check(model, tokenizer, selections: Mapping[tuple[str, str], Sequence[Sequence[int]]], *,
                    n: int = 500, repeats: int = 10, seed: int = 0, n_boxes: int = 7, batch_size: int = 32,
                    model_name: str = "", progress: bool = False, reuse_prefix: bool = True,
                    sources: str = "fresh") -> list[SemanticsResult]:
    """The paper's cross-model check (docs/method.md §7): for each ``(group, desideratum) -> heads`` (typically
    ``DcmResult.selections()`` of another model), patch those heads' z from the source at the group's
    position into ``model`` and score against the desideratum's target; ``repeats`` times with fresh
    sources (pair seed ``1000 * seed + r``; fresh contexts or other base examples: ``sources``), on ``n`` base
    examples of their own data stream."""
    if repeats < 1 or n < 1:
        raise EtbenchError("semantics check needs n >= 1 and repeats >= 1")
    hm = head_map(model)
    sel = {(group_name(g), d): tuple((int(l), int(h)) for l, h in hs) for (g, d), hs in selections.items()}
    for (g, d), hs in sel.items():
        if d not in DESIDERATA:
            raise EtbenchError(f"unknown desideratum {d!r}")
        check_heads_fit({g: hs}, hm.spec, model_name or "the model")
    examples, pool, labels = dcm_examples(tokenizer, n, n_boxes, seed, SEMANTICS_DATA_SEED_OFFSET)
    desiderata = list(dict.fromkeys(d for _, d in sel))
    runner = None
    acc: dict[tuple[str, str], list[float]] = {k: [] for k in sel}
    flags: dict[tuple[str, str], list[tuple[bool, ...]]] = {k: [] for k in sel}
    rows = torch.arange(n)
    work = [(r, d) for r in range(repeats) for d in desiderata]
    jobs = []
    for r, d in track(work, "semantics sources", total=len(work), enabled=progress):
        ps = make_pair_sets(tokenizer, examples, [d], 1000 * seed + r, pool, labels, sources)[d]
        if runner is None:
            ids, lays = _base_ids({d: ps})
            runner = PatchRunner(model, ids, batch_size, reuse_prefix)
            pos = _group_positions(lays, GROUPS)
        need = {g: hs for (g, dd), hs in sel.items() if dd == d and hs}
        src = _source_values(model, hm, ps, need, batch_size, runner)
        jobs += [((r, g, d), hs, [True] * len(hs), src[g], pos[g], ps.targets) if hs else
                 ((r, g, d), hs, [], None, pos[g], ps.targets) for (g, dd), hs in sel.items() if dd == d]
    # every repeat's patched runs together: a few tokens a row, so merging them saves weight reads
    for (r, g, d), correct in _evaluate(runner, rows, jobs, batch_size).items():
        acc[(g, d)].append(sum(correct) / len(correct))
        flags[(g, d)].append(tuple(bool(x) for x in correct))
    return [SemanticsResult(model_name, g, d, hs, tuple(acc[(g, d)]), n, tuple(flags[(g, d)]))
            for (g, d), hs in sel.items()]


# ----------------------------------------------------------------------------------------------
# Tables


def format_dcm(result: DcmResult) -> str:
    from tabulate import tabulate

    rows = [[GROUP_CODES[m.group], m.desideratum, f"{len(m.selected)}/{len(m.heads)}", f"{m.val_accuracy:.3f}",
             f"{m.test.value:.3f}", f"[{m.test.low:.3f}, {m.test.high:.3f}]", format_heads(m.selected)]
            for m in result.masks]
    return tabulate(rows, headers=["group", "desideratum", "patched", "val acc", "test acc", "95% CI", "heads"],
                    tablefmt="github", disable_numparse=True)


def format_semantics(results: Sequence[SemanticsResult]) -> str:
    from tabulate import tabulate

    rows = [[r.model, GROUP_CODES[r.group], r.desideratum, len(r.heads), f"{100 * r.mean:.1f} ± {100 * r.sd:.1f}",
             len(r.accuracies), r.n] for r in results]
    return tabulate(rows, headers=["model", "group", "desideratum", "heads", "acc % (mean ± sd)", "repeats", "n"],
                    tablefmt="github", disable_numparse=True)
