"""Circuit-form ceilings and circuit size chosen by faithfulness (issue #12).

* **Ceilings** of one model under mean ablation, on the evaluation prompts: the full model; *every
  head at every position* kept through the ablation edits (must equal the full model: a check of
  the edit path, not a measurement); the circuit **form** with every head kept at its three
  position classes (last token, query label, the label's earlier copy), which bounds what any
  circuit of that form can reach; and *no heads* (everything meaned), the floor.
* **Two normalisations** of a circuit's accuracy m(C): the paper's ratio m(C) / m(N) and MIB's
  (m(C) - m(∅)) / (m(N) - m(∅)), where m(∅) is the floor.
* **Growth**: a circuit grown along the discovery ranking until its faithfulness reaches
  ``target_fraction`` x the form's ceiling. Strategy ``scaled-shape``: the circuit at scale s takes
  the top ⌈s x k_g⌉ heads of each group's ranking, where k_g is the group's paper-proportioned size
  (discovery's ``candidate_k``: s = 1 is the paper's top-k); s doubles from 1 until the target is
  reached (or every ranking is used up), then a bisection between the last scale below the target
  and the first at it finds the smallest scale that reaches it. The evaluated scales are the record
  (a curve over size); when the whole ranking stays below the target, the result says so.
  Why this strategy: each evaluation is a mean-ablated pass over the sizing prompts, and this one
  needs O(log N) of them; the earlier greedy doubling per group (try doubling each of the four groups,
  keep the best gain per node) needed up to four per step and ~100 on tiny-base (over 30 minutes on
  2 cores for one model) whenever the target lay beyond the exactly verified heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.core.stats import Proportion, mib_normalised, paper_ratio, proportion_ci, ratio_of_sums_ci
from etbench.mech.forward import forward
from etbench.mech.interventions import replace_where
from etbench.metrics.ablation import AblationRunner
from etbench.schema.circuit import GROUPS, POSITION_CLASSES, Circuit, Node

Head = tuple[int, int]


@dataclass
class Ceilings:
    """Accuracy of one model under the reference ablations (same prompts, same mean)."""

    form: str  # "paper": A/B at the last token, C at the query label, D at its earlier copy
    n: int
    mean_n: int
    model: Proportion  # no edits
    every_head_every_position: Proportion  # through the ablation edits with nothing meaned
    form_all_heads: Proportion  # every head kept at the form's position classes
    no_heads: Proportion  # every head meaned everywhere (the floor)
    form_faithfulness: float  # paper ratio of form_all_heads
    form_faithfulness_ci: tuple[float, float]
    form_mib: float  # MIB normalisation of form_all_heads
    # per-item outcomes, for paired statistics
    model_correct: tuple[bool, ...] = ()
    form_correct: tuple[bool, ...] = ()
    none_correct: tuple[bool, ...] = ()
    every_correct: tuple[bool, ...] = ()


def _acc(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


@torch.no_grad()
def every_head_kept_correct(runner: AblationRunner) -> list[bool]:
    """Per prompt: correct with every head kept at every position *through* the ablation edits (a
    replace-where edit whose mask keeps everything). Equal to the clean model unless the edit path
    itself changes something."""
    out = [False] * len(runner.lays)
    spec = runner.hm.spec
    for start in range(0, len(runner.lays), runner.batch_size):
        chunk = runner.lays[start: start + runner.batch_size]
        by_len: dict[int, list[int]] = {}
        for i, lay in enumerate(chunk):
            by_len.setdefault(lay.length, []).append(i)
        for length, rows in by_len.items():
            lays = [chunk[r] for r in rows]
            keep = torch.ones(len(lays), length, spec.n_heads, dtype=torch.bool)
            edits = [replace_where(layer, "z", runner.mean.z[layer][:length], keep) for layer in range(spec.n_layers)]
            logits = forward(runner.model, torch.tensor([lay.input_ids for lay in lays]), runner.hm, edits,
                             runner.counter).logits[:, -1]
            for r, lay, t in zip(rows, lays, logits.argmax(-1).tolist()):
                out[start + r] = t == lay.target_id
    return out


def form_all_heads(n_layers: int, n_heads: int) -> dict[str, set[Head]]:
    """Every head at every position class of the paper's form."""
    every = {(layer, head) for layer in range(n_layers) for head in range(n_heads)}
    return {pc: set(every) for pc in POSITION_CLASSES}


def ceilings(runner: AblationRunner, seed: int = 0) -> Ceilings:
    """The reference accuracies of ``runner``'s model on its prompts (see the module doc)."""
    if runner.mean is None:
        raise EtbenchError("ceilings need mean activations")
    spec = runner.hm.spec
    model = runner.correct()
    every = every_head_kept_correct(runner)
    form = runner.correct(keep=form_all_heads(spec.n_layers, spec.n_heads))
    none = runner.correct(keep={})
    m, f, z = _acc(model), _acc(form), _acc(none)
    prop = lambda flags: proportion_ci(sum(flags), len(flags))  # noqa: E731
    return Ceilings("paper", len(model), runner.mean.n_prompts, prop(model), prop(every), prop(form), prop(none),
                    paper_ratio(f, m), ratio_of_sums_ci(form, model, seed=seed), mib_normalised(f, m, z),
                    tuple(model), tuple(form), tuple(none), tuple(every))


@dataclass
class GrowthStep:
    sizes: dict[str, int]  # top-k of each group's ranking
    size: int  # nodes
    accuracy: float
    faithfulness: float  # paper ratio
    mib: float
    added: str  # how the step was chosen: "empty", "double" or "bisect"
    scale: float = 0.0  # s: each group's top ceil(s x k_g)
    correct: tuple[bool, ...] = ()  # per sizing prompt: the rows ``accuracy`` is re-derived from


@dataclass
class CircuitGrowth:
    strategy: str
    target_fraction: float
    target_faithfulness: float  # target_fraction x the form's ceiling (paper ratio)
    reached: bool
    chosen: dict[str, int]  # top-k per group of the chosen circuit (the smallest scale found at the target)
    steps: list[GrowthStep] = field(default_factory=list)  # evaluated circuits, by size
    note: str = ""


def _circuit(rankings: Mapping[str, Sequence[Head]], sizes: Mapping[str, int], scores=None) -> Circuit:
    groups = {}
    for g in GROUPS:
        heads = list(rankings.get(g, ()))[: sizes.get(g, 0)]
        groups[g] = tuple(Node(g, layer, head, None if scores is None else scores[g][layer][head])
                          for layer, head in heads)
    return Circuit(groups)


def scaled_sizes(shape: Mapping[str, int], limits: Mapping[str, int], scale: float) -> dict[str, int]:
    """Each group's top-k at ``scale``: ceil(scale x shape[g]), at most the ranking's length."""
    return {g: min(limits[g], math.ceil(scale * shape.get(g, 1) - 1e-9)) if scale > 0 else 0 for g in GROUPS}


def grow_circuit(runner: AblationRunner, rankings: Mapping[str, Sequence[Head]], *, ceiling: Ceilings,
                 target_fraction: float = 0.9, shape: Mapping[str, int] | None = None,
                 resolution: float = 1 / 64) -> CircuitGrowth:
    """Grow a circuit along ``rankings`` (per group, most important first) at the paper's proportions
    ``shape`` (default: one head per group per unit of scale) until its faithfulness reaches
    ``target_fraction`` x ``ceiling.form_faithfulness`` (module docstring: strategy ``scaled-shape``).
    ``resolution``: the bisection stops when the bracketing scales are closer than this (relative)."""
    if not 0 < target_fraction <= 1:
        raise EtbenchError(f"target fraction must be in (0, 1], got {target_fraction}")
    m, z = ceiling.model.value, ceiling.no_heads.value
    target = target_fraction * ceiling.form_faithfulness
    limits = {g: len(rankings.get(g, ())) for g in GROUPS}
    shape = {g: max(1, int((shape or {}).get(g, 1))) for g in GROUPS}
    if not math.isfinite(target) or target <= 0:
        return CircuitGrowth("scaled-shape", target_fraction, target, False, {g: 0 for g in GROUPS}, [],
                             "nothing to grow: the model or the form's ceiling scores 0 on these prompts")
    evaluated: dict[tuple[int, ...], GrowthStep] = {}

    def step(scale: float, how: str) -> GrowthStep:
        sizes = scaled_sizes(shape, limits, scale)
        key = tuple(sizes[g] for g in GROUPS)
        if key not in evaluated:
            # the empty circuit is the ceilings' floor, already measured on these prompts
            flags = (tuple(ceiling.none_correct) if not any(key) else
                     tuple(bool(x) for x in runner.correct(keep=_circuit(rankings, sizes).kept())))
            acc = z if not any(key) else _acc(flags)
            evaluated[key] = GrowthStep(sizes, sum(key), acc, paper_ratio(acc, m), mib_normalised(acc, m, z), how,
                                        scale, flags)
        return evaluated[key]

    def at_target(s: GrowthStep) -> bool:
        return s.faithfulness >= target

    lo, hi = 0.0, None
    if not at_target(step(0.0, "empty")):
        full = max(limits[g] / shape[g] for g in GROUPS)
        scale = 1.0
        while True:
            if at_target(step(scale, "double")):
                hi = scale
                break
            lo = scale
            if scale >= full:
                break
            scale = min(2 * scale, full)
        while hi is not None and hi - lo > resolution * hi:
            mid = (lo + hi) / 2
            sizes, low, high = (scaled_sizes(shape, limits, x) for x in (mid, lo, hi))
            if sizes == low:
                lo = mid  # no circuit between: narrow without an evaluation
            elif sizes == high:
                hi = mid
            elif at_target(step(mid, "bisect")):
                hi = mid
            else:
                lo = mid
    else:
        hi = 0.0
    steps = sorted(evaluated.values(), key=lambda s: (s.size, s.scale))
    reached = hi is not None
    chosen = scaled_sizes(shape, limits, hi) if reached else dict(limits)
    note = "" if reached else (f"target {target:.3f} not reached: the best circuit reached "
                               f"{max(s.faithfulness for s in steps):.3f} (form ceiling "
                               f"{ceiling.form_faithfulness:.3f})")
    return CircuitGrowth("scaled-shape", target_fraction, target, reached, chosen, steps, note)
