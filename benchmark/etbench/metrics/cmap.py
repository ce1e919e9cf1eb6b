"""CMAP, Cross-Model Activation Patching (docs/method.md §9): does the fine-tuned model's version of a circuit
group make the *base* model better?

The same prompts run through the fine-tuned model (its heads' values cached at the positions needed,
nothing else) and then through the base model with those values patched in; the base's top-1
accuracy (whole vocabulary, the paper's metric) is compared with its own and with the fine-tuned's.

Variants
--------
* ``output`` (the paper's main result): each patched head's ``z`` (the input of the attention output
  projection, before W_O) at its group's position; the **base's** own W_O (and anything after it)
  then applies. Per group and ``full`` (every group at its own position; a head listed in two groups is
  patched at both positions). ``all_positions=True`` patches every position instead.
* ``q``, ``k``, ``v``, ``qk``, ``qkv`` (input CMAP): the group's heads' query at the group position
  and/or their keys/values at every position up to it, from the fine-tuned run; at the same time
  every head's z at positions before the group position is frozen to the base's own clean z, and so
  is every *other* head's z at the group position. The patched inputs can therefore change nothing
  but the group's own heads' z at the group position (under grouped-query attention a patched KV head
  is shared by several query heads: the freeze keeps the others at their clean z). Defined for the
  groups read at the last token (value_fetcher, position_transmitter), as in the paper: for an earlier
  position, heads at later positions that share a patched KV head would see the patched keys too.

Scores
------
``gain = patched - base`` accuracy and ``normalised gain = (patched - base) / (ft - base)``, each with a
paired bootstrap CI over items (``etbench.core.stats``); the normalised gain is undefined (value None, with a
note) when the fine-tuned model's accuracy gain over the base is not clearly nonzero (its paired 95% CI
contains 0): a ratio whose denominator may be 0 has no bounded interval (Fieller), and its bootstrap
"CI" is an artefact of the resampling. Per-item rows go to the scorecard side file.

The two models must share their head layout (HeadSpec sizes) and tokenize the prompts identically.
Heads patched are whatever the caller passes per group; ``paper_patch_heads`` builds the paper's
choice (the fine-tuned model's own circuit filtered by DCM). Head lists are copied into tuples, so no
group's list is ever extended in place (the reference's bug B7).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.core.progress import track
from etbench.core.stats import (
    Proportion,
    format_estimate_of,
    proportion_ci,
)
from etbench.mech.forward import device_of
from etbench.mech.heads import head_map
from etbench.mech.interventions import Edit, mix, read, replace, replace_where, run
from etbench.mech.prefix import PatchRunner, packed, predicted
from etbench.metrics.cmap_scores import cmap_score
from etbench.metrics.dcm import (
    MERGED_BATCHES,
    DcmResult,
    HeadsByGroup,
    by_layer,
    check_heads_fit,
    format_heads,
    normalise_heads,
)
from etbench.schema.circuit import GROUP_CODES, GROUP_POSITION, GROUPS, Circuit, Head, group_name
from etbench.schema.scorecard import CmapScore
from etbench.task.layout import Layout, layouts
from etbench.task.prompts import Example

VARIANTS: tuple[str, ...] = ("output", "q", "k", "v", "qk", "qkv")
INPUT_VARIANTS: tuple[str, ...] = VARIANTS[1:]
FULL = "full"


# ----------------------------------------------------------------------------------------------
# Which heads


def paper_patch_heads(circuit: Circuit | HeadsByGroup, dcm: DcmResult | Mapping[tuple[str, str], Sequence[Head]],
                      ) -> dict[str, tuple[Head, ...]]:
    """The paper's CMAP heads from the fine-tuned model's own circuit and its DCM results:
    A = DCM object_value heads, B and C = DCM positional heads, D = the whole group."""
    groups = normalise_heads(circuit)
    sel = dcm.selections() if isinstance(dcm, DcmResult) else {(group_name(g), d): hs for (g, d), hs in dcm.items()}
    rule = {"value_fetcher": "object_value", "position_transmitter": "positional", "position_detector": "positional"}
    out: dict[str, tuple[Head, ...]] = {}
    for g, hs in groups.items():
        if g in rule:
            if (g, rule[g]) not in sel:
                raise EtbenchError(f"no DCM {rule[g]} result for {g}: run DCM on the fine-tuned circuit first")
            chosen = {tuple(h) for h in sel[(g, rule[g])]}
            out[g] = tuple(h for h in hs if h in chosen)
        else:
            out[g] = tuple(hs)
    return out


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class CmapRun:
    variant: str
    group: str  # a group name or "full"
    heads: dict[str, tuple[Head, ...]]  # what was patched, per group
    correct: tuple[bool, ...]  # base model with the patch, per item
    predicted: tuple[int, ...] = ()  # its top-1 token id, per item

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else float("nan")


@dataclass
class CmapResult:
    base_model: str
    ft_model: str
    n_boxes: int
    base_correct: tuple[bool, ...]
    ft_correct: tuple[bool, ...]
    runs: list[CmapRun]
    all_positions: bool = False
    base_predicted: tuple[int, ...] = ()
    ft_predicted: tuple[int, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def base_accuracy(self) -> Proportion:
        return proportion_ci(sum(self.base_correct), len(self.base_correct))

    @property
    def ft_accuracy(self) -> Proportion:
        return proportion_ci(sum(self.ft_correct), len(self.ft_correct))

    def get(self, variant: str, group: str) -> CmapRun:
        g = group if group == FULL else group_name(group)
        for r in self.runs:
            if r.variant == variant and r.group == g:
                return r
        raise EtbenchError(f"no CMAP run for variant {variant}, group {g}")

    def scores(self, seed: int = 0, n_resamples: int = 2000) -> list["CmapScore"]:
        """``scorecard.CmapScore`` per run: patched accuracy (Wilson), gain and normalised gain
        (paired bootstrap over items, seeded)."""
        return [cmap_score(r.variant, r.group, self.base_correct, self.ft_correct, r.correct, seed=seed,
                           n_resamples=n_resamples) for r in self.runs]

    def item_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, (b, f) in enumerate(zip(self.base_correct, self.ft_correct)):
            rows.append({"measure": "cmap", "model": "base", "variant": "none", "group": "none",
                         "n_boxes": self.n_boxes, "item": i, "correct": bool(b)})
            rows.append({"measure": "cmap", "model": "ft", "variant": "none", "group": "none",
                         "n_boxes": self.n_boxes, "item": i, "correct": bool(f)})
        for r in self.runs:
            rows += [{"measure": "cmap", "model": "base", "variant": r.variant, "group": r.group,
                      "n_boxes": self.n_boxes, "item": i, "correct": bool(c)} for i, c in enumerate(r.correct)]
        return rows


# ----------------------------------------------------------------------------------------------
# Checks


def check_compatible(model_base, model_ft, tokenizer_base, tokenizer_ft, examples: Sequence[Example],
                     ) -> list[Layout]:
    """The base's layouts; a clear error unless both models have the same head layout and tokenize
    every prompt (and answer) to the same ids."""
    a, b = head_map(model_base).spec, head_map(model_ft).spec
    shape = ("n_layers", "n_heads", "n_kv_heads", "d_head")
    if any(getattr(a, k) != getattr(b, k) for k in shape):
        def desc(s):
            return f"{s.family} {s.n_layers} layers x {s.n_heads} heads ({s.n_kv_heads} kv), d_head {s.d_head}"

        raise EtbenchError(f"CMAP needs two models of one architecture: base is {desc(a)}, fine-tuned is {desc(b)}")
    lays = layouts(examples, tokenizer_base)
    if tokenizer_ft is not None and tokenizer_ft is not tokenizer_base:
        other = layouts(examples, tokenizer_ft)
        for i, (x, y) in enumerate(zip(lays, other)):
            if x.input_ids != y.input_ids or x.target_id != y.target_id:
                raise EtbenchError(f"CMAP needs one tokenizer: the two models' tokenizers encode prompt {i} "
                                   f"differently ({examples[i].prompt[:40]!r}...)")
    lengths = {lay.length for lay in lays}
    if len(lengths) != 1:
        raise EtbenchError(f"CMAP prompts must share one token length (one box count), got {sorted(lengths)}")
    return lays


# ----------------------------------------------------------------------------------------------
# Running


def _keep_mask(batch: int, seq: int, n_heads: int, pos: torch.Tensor, heads_here: Sequence[int]) -> torch.Tensor:
    """``[B, S, H]`` true where z stays free: positions after ``pos``, and the listed heads at ``pos``."""
    t = torch.arange(seq)[None, :, None]
    p = pos[:, None, None]
    keep = (t > p).expand(batch, seq, n_heads).clone()
    if heads_here:
        at = (t == p).expand(batch, seq, n_heads)
        h = torch.zeros(n_heads, dtype=torch.bool)
        h[list(heads_here)] = True
        keep |= at & h[None, None, :]
    return keep


def _up_to(values: torch.Tensor, pos: torch.Tensor):
    """An edit fn writing ``values`` ``[B, S, n, d]`` at positions <= pos (per row), leaving later ones."""

    def fn(cur: torch.Tensor) -> torch.Tensor:
        s = cur.shape[1]
        m = (torch.arange(s, device=cur.device)[None, :] <= pos.to(cur.device)[:, None])[:, :, None, None]
        return torch.where(m, values.to(cur.device, cur.dtype), cur)

    return fn


def run_cmap(model_base, model_ft, tokenizer, heads: Circuit | HeadsByGroup, examples: Sequence[Example], *,
             tokenizer_ft=None, variants: Sequence[str] = ("output",), groups: Sequence[str] | None = None,
             all_positions: bool = False, batch_size: int = 16, base_name: str = "base", ft_name: str = "ft",
             progress: bool = False, reuse_prefix: bool = True) -> CmapResult:
    """Patch the fine-tuned model's head values into the base model, per group and for the full set.

    ``heads``: ``{group: [(layer, head), ...]}`` or a ``Circuit`` (see ``paper_patch_heads``).
    ``groups``: which runs (group names/letters and/or ``"full"``); default every group with heads,
    plus ``"full"`` for the output variant. Input variants run for last-token groups only."""
    return run_cmap_sets(model_base, model_ft, tokenizer, {"": (heads, variants)}, examples,
                         tokenizer_ft=tokenizer_ft, groups=groups, all_positions=all_positions,
                         batch_size=batch_size, base_name=base_name, ft_name=ft_name, progress=progress,
                         reuse_prefix=reuse_prefix)[""]


@dataclass
class _HeadSet:
    """One labelled set of heads to patch: its groups' heads, the runs (variant, group) and what they patch."""

    heads: dict[str, tuple[Head, ...]]
    jobs: list[tuple[str, str]]
    patch_sets: dict[str, dict[str, tuple[Head, ...]]]
    kv_heads: dict[str, list[int]]
    needs_inputs: bool


def _head_set(heads, variants: Sequence[str], groups: Sequence[str] | None, spec, base_name: str) -> _HeadSet:
    for v in variants:
        if v not in VARIANTS:
            raise EtbenchError(f"unknown CMAP variant {v!r}; known: {', '.join(VARIANTS)}")
    hbg = {g: hs for g, hs in normalise_heads(heads).items() if hs}
    if not hbg:
        raise EtbenchError("CMAP needs at least one group with heads")
    check_heads_fit(hbg, spec, base_name)
    if groups is None:
        wanted = list(hbg) + ([FULL] if len(hbg) > 1 or "output" in variants else [])
    else:
        wanted = [g if g == FULL else group_name(g) for g in groups]
        missing = [g for g in wanted if g != FULL and g not in hbg]
        if missing:
            raise EtbenchError(f"CMAP groups without heads: {', '.join(missing)}")
    jobs: list[tuple[str, str]] = []
    for v in variants:
        for g in wanted:
            if v == "output":
                jobs.append((v, g))
            elif g != FULL and GROUP_POSITION[g] == "last":
                jobs.append((v, g))
            elif groups is not None:
                raise EtbenchError(f"input CMAP ({v}) is defined for last-token groups only, not {g}")
    return _HeadSet(hbg, jobs, {g: ({g: hbg[g]} if g != FULL else dict(hbg)) for g in wanted},
                    {g: sorted({spec.kv_head(h) for _, h in hbg[g]}) for g in hbg},
                    any(v != "output" for v, _ in jobs))


def run_cmap_sets(model_base, model_ft, tokenizer, head_sets: Mapping[str, tuple[Circuit | HeadsByGroup,
                                                                                Sequence[str]]],
                  examples: Sequence[Example], *, tokenizer_ft=None, groups: Sequence[str] | None = None,
                  all_positions: bool = False, batch_size: int = 16, base_name: str = "base", ft_name: str = "ft",
                  progress: bool = False, reuse_prefix: bool = True) -> dict[str, CmapResult]:
    """``run_cmap`` for several labelled head sets at once (``{label: (heads, variants)}``), one
    ``CmapResult`` per label: the base's clean runs and the fine-tuned run are shared (each prompt once per
    model, not once per set); every patched run is the one ``run_cmap`` of that set alone would do, so the
    results are the same."""
    t0 = time.perf_counter()
    if not examples:
        raise EtbenchError("CMAP needs at least one example")
    if not head_sets:
        raise EtbenchError("CMAP needs at least one head set")
    lays = check_compatible(model_base, model_ft, tokenizer, tokenizer_ft, examples)
    hm_b, hm_f = head_map(model_base), head_map(model_ft)
    spec = hm_b.spec
    sets = {label: _head_set(hs, variants, groups, spec, base_name) for label, (hs, variants) in head_sets.items()}

    ids = torch.tensor([lay.input_ids for lay in lays], dtype=torch.long)
    targets = torch.tensor([lay.target_id for lay in lays], dtype=torch.long)
    n, seq = ids.shape
    runner = PatchRunner(model_base, ids, batch_size, reuse_prefix and not all_positions)
    t_clean = time.perf_counter()
    pos = {g: torch.tensor([lay.position(GROUP_POSITION[g]) for lay in lays]) for g in GROUPS}
    device_f = device_of(model_ft)
    need_in = any(s.needs_inputs for s in sets.values())

    ft_pred: list[int] = []
    pred: dict[tuple[str, str, str], list[int]] = {(label, *j): [] for label, s in sets.items() for j in s.jobs}
    chunks = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    output_patches: list[_OutputPatch] = []
    pending: list[tuple[tuple[str, str, str], Any]] = []
    for rows in track(chunks, "CMAP", total=len(chunks), enabled=progress):
        b = len(rows)
        # 1. the fine-tuned run: z (and q/k/v) of every set's heads, only where they will be patched
        stores: dict[str, dict] = {label: {} for label in sets}
        edits: list[Edit] = []
        for label, hset in sets.items():
            store = stores[label]
            for g, hs in hset.heads.items():
                p = None if all_positions else pos[g][rows].to(device_f)
                for layer, _, h in by_layer(hs):
                    edits.append(read(layer, "z", store, p, h, key=("z", g, layer)))
                    if hset.needs_inputs and GROUP_POSITION[g] == "last":
                        edits.append(read(layer, "q", store, pos[g][rows].to(device_f), h, key=("q", g, layer)))
                        kvh = sorted({spec.kv_head(x) for x in h})
                        edits.append(read(layer, "k", store, None, kvh, key=("k", g, layer)))
                        edits.append(read(layer, "v", store, None, kvh, key=("v", g, layer)))
        with torch.no_grad():
            out = run(model_ft, hm_f, {"input_ids": ids[rows].to(device_f)}, edits)
        ft_pred += out.logits[:, -1].argmax(-1).cpu().tolist()
        del out
        # 2. the base's clean z everywhere (input variants freeze it), once per batch
        clean_z: dict = {}
        if need_in:
            with torch.no_grad():
                run(model_base, hm_b, {"input_ids": ids[rows].to(runner.device)},
                    [read(layer, "z", clean_z) for layer in range(spec.n_layers)], logits_to_keep=1)
        # 3. patched base runs; a run two sets share (the same variant, group and heads, e.g. the structure
        # reader, which the paper's rule patches whole) runs once: its values come from the same fine-tuned run.
        # Output patches over the clean prefix are a few tokens a row: they run after the loop, merged.
        done: dict[tuple, Any] = {}
        for label, hset in sets.items():
            store = stores[label]
            for v, g in hset.jobs:
                key = (v, g, tuple((k, tuple(hs)) for k, hs in hset.patch_sets[g].items()))
                if key not in done:
                    if v == "output" and not all_positions:
                        done[key] = _OutputPatch(rows, hset.patch_sets[g], store)
                        output_patches.append(done[key])
                    else:
                        with torch.no_grad():
                            if v == "output":
                                logits = _output_patch_everywhere(runner, rows, hset.patch_sets[g], store)
                            else:
                                logits = _input_patch(runner, rows, v, g, hset.heads[g], hset.kv_heads, store,
                                                      clean_z, pos, spec, b, seq)
                        done[key] = logits.argmax(-1).cpu().tolist()
                pending.append(((label, v, g), done[key]))
    _run_output_patches(runner, output_patches, pos, MERGED_BATCHES * batch_size)
    for key, outcome in pending:  # in chunk order: each run's predictions come back in row order
        pred[key] += outcome.predicted if isinstance(outcome, _OutputPatch) else outcome
    tgt = targets.tolist()

    def correct(p: list[int]) -> tuple[bool, ...]:
        return tuple(a == t for a, t in zip(p, tgt))

    base_pred = runner.base_argmax.tolist()
    t_end = time.perf_counter()
    n_runs = sum(len(s.jobs) for s in sets.values())
    timings = {"total_s": t_end - t0, "clean_s": t_clean - t0, "patch_s": t_end - t_clean, "runs": n_runs,
               "run_s": (t_end - t_clean) / max(1, n_runs), "n": n}
    results = {}
    for label, hset in sets.items():
        runs = [CmapRun(v, g, {k: tuple(hs) for k, hs in hset.patch_sets[g].items()}, correct(pred[(label, v, g)]),
                        tuple(pred[(label, v, g)])) for v, g in hset.jobs]
        results[label] = CmapResult(base_name, ft_name, examples[0].n_boxes, correct(base_pred), correct(ft_pred),
                                    runs, all_positions=all_positions, timings=dict(timings),
                                    base_predicted=tuple(base_pred), ft_predicted=tuple(ft_pred))
    return results


@dataclass(eq=False)
class _OutputPatch:
    """One output-variant patched run of a batch's rows: the fine-tuned values in ``store`` written into
    the base at each group's position; ``predicted`` is filled by ``_run_output_patches``."""

    rows: torch.Tensor
    patch: Mapping[str, Sequence[Head]]
    store: dict
    predicted: list[int] = field(default_factory=list)


def _run_output_patches(runner: PatchRunner, patches: Sequence[_OutputPatch], pos: Mapping[str, torch.Tensor],
                        max_rows: int) -> None:
    """The runs of ``patches`` merged, up to ``max_rows`` rows a forward: each row gets its own run's values
    through a 0/1 mix over the union of the merged runs' heads of each group and layer (exactly the
    fine-tuned value where 0, the run's own value where 1); each row is fed from its earliest patch."""
    dev = runner.device
    for group in packed(patches, lambda patch: len(patch.rows), max_rows):
        rows = torch.cat([p.rows for p in group])
        union: dict[tuple[str, int], list[int]] = {}
        for p in group:
            for g, hs in p.patch.items():
                for layer, _, h in by_layer(hs):
                    union.setdefault((g, layer), [])
                    union[(g, layer)] += [x for x in h if x not in union[(g, layer)]]
        last = torch.cat([pos["value_fetcher"][p.rows] for p in group])  # a valid position for any row
        values, keep, where = {}, {}, {}
        starts = last.clone()
        for (g, layer), heads in union.items():
            d = next(p.store[("z", g, layer)] for p in group if ("z", g, layer) in p.store).shape[-1]
            values[(g, layer)] = torch.zeros((len(rows), len(heads), d))
            keep[(g, layer)] = torch.ones((len(rows), len(heads)))
            where[(g, layer)] = last.clone()  # rows that do not patch this group: a no-op at a fed position
        at = 0
        for p in group:
            block = slice(at, at + len(p.rows))
            for g, hs in p.patch.items():
                here = pos[g][p.rows]
                starts[block] = torch.minimum(starts[block], here)
                for layer, _, h in by_layer(hs):
                    cols = [union[(g, layer)].index(x) for x in h]
                    values[(g, layer)][block, cols] = p.store[("z", g, layer)].float().cpu()
                    keep[(g, layer)][block, cols] = 0.0
                    where[(g, layer)][block] = here
            at += len(p.rows)

        def make(sub: torch.Tensor, shift: int) -> list[Edit]:
            return [mix(layer, "z", values[(g, layer)][sub].to(dev), keep[(g, layer)][sub].to(dev),
                        (where[(g, layer)][sub] - shift).to(dev), heads) for (g, layer), heads in union.items()]

        with torch.no_grad():
            tokens = runner.logits(rows, runner.stored(rows), starts, make, reduce=predicted).cpu().tolist()
        at = 0
        for p in group:
            p.predicted = tokens[at : at + len(p.rows)]
            at += len(p.rows)


def _output_patch_everywhere(runner: PatchRunner, rows, patch: Mapping[str, Sequence[Head]], store):
    """The fine-tuned values written into the base at every position (``all_positions``): a whole-prompt run."""
    def make(sub: torch.Tensor, shift: int) -> list[Edit]:
        return [replace(layer, "z", store[("z", g, layer)][sub.to(store[("z", g, layer)].device)], None, h)
                for g, hs in patch.items() for layer, _, h in by_layer(hs)]

    return runner.logits(rows, None, 0, make)


def _input_patch(runner: PatchRunner, rows, variant, g, hs, kv_heads, store, clean_z, pos, spec, b, seq):
    p = pos[g][rows]
    dev = runner.device
    layers = by_layer(hs)
    edits: list[Edit] = []
    for layer, _, h in layers:
        if "q" in variant:
            edits.append(replace(layer, "q", store[("q", g, layer)], p.to(dev), h))
        kvh = sorted({spec.kv_head(x) for x in h})
        for kind in ("k", "v"):
            if kind in variant:
                edits.append(Edit(layer, kind, _up_to(store[(kind, g, layer)], p), None, kvh))
    heads_at = {layer: h for layer, _, h in layers}
    for layer in range(spec.n_layers):
        keep = _keep_mask(b, seq, spec.n_heads, p, heads_at.get(layer, []))
        edits.append(replace_where(layer, "z", clean_z[(layer, "z")], keep))
    return runner.logits(rows, None, 0, lambda sub, shift: edits)


# ----------------------------------------------------------------------------------------------
# Tables


def format_cmap(result: CmapResult, seed: int = 0) -> str:
    from tabulate import tabulate

    rows = []
    for r, s in zip(result.runs, result.scores(seed)):
        heads = sum(len(v) for v in r.heads.values())
        rows.append([r.variant, r.group if r.group == FULL else GROUP_CODES[r.group], heads,
                     f"{s.patched_accuracy.value:.3f}", format_estimate_of(s.gain, undefined="undefined", signed=True, show_note=False),
                     format_estimate_of(s.normalised_gain, undefined="undefined", signed=True, show_note=False)])
    head = (f"base {result.base_model}: {result.base_accuracy.value:.3f}   "
            f"fine-tuned {result.ft_model}: {result.ft_accuracy.value:.3f}   n = {len(result.base_correct)}")
    table = tabulate(rows, headers=["variant", "group", "heads", "patched acc", "gain [95% CI]",
                                    "normalised gain [95% CI]"], tablefmt="github", disable_numparse=True)
    return f"{head}\n{table}"


__all__ = ["VARIANTS", "INPUT_VARIANTS", "FULL", "CmapRun", "CmapResult", "run_cmap", "run_cmap_sets",
           "paper_patch_heads", "check_compatible", "format_cmap", "format_heads"]
