"""Circuit-form ceilings and circuit size chosen by faithfulness (issue #12).

* **Ceilings** of one model under mean ablation, on the evaluation prompts: the full model; *every
  head at every position* kept through the ablation edits (must equal the full model: a check of
  the edit path, not a measurement); the circuit **form** with every head kept at its three
  position classes (last token, query label, the label's earlier copy), which bounds what any
  circuit of that form can reach; and *no heads* (everything meaned), the floor.
* **Two normalisations** of a circuit's accuracy m(C): the paper's ratio m(C) / m(N) and MIB's
  (m(C) - m(∅)) / (m(N) - m(∅)), where m(∅) is the floor.
* **Growth**: a circuit grown along the discovery ranking until its faithfulness reaches
  ``target_fraction`` x the form's ceiling. Strategy ``greedy-doubling``: start empty; at each step
  try doubling each group's top-k (0 -> 1 -> 2 -> 4 ...) and take the group whose doubling gains the
  most accuracy per node added (ties: fewer nodes). The steps are the record (a curve over size);
  when every group is exhausted below the target, the result says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from etbench.core.errors import EtbenchError
from etbench.core.stats import Proportion, mib_normalised, proportion_ci, ratio_of_sums_ci
from etbench.mech.forward import forward
from etbench.mech.interventions import replace_where
from etbench.metrics.ablation import AblationRunner
from etbench.schema.circuit import GROUPS, POSITION_CLASSES, Circuit, Node

Head = tuple[int, int]


def paper_ratio(circuit_acc: float, model_acc: float) -> float:
    """The paper's faithfulness: circuit accuracy / model accuracy (nan when the model scores 0)."""
    return circuit_acc / model_acc if model_acc > 0 else float("nan")


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
    added: str  # the group grown at this step ("" for the start)


@dataclass
class CircuitGrowth:
    strategy: str
    target_fraction: float
    target_faithfulness: float  # target_fraction x the form's ceiling (paper ratio)
    reached: bool
    chosen: dict[str, int]  # top-k per group of the chosen circuit (the first step at the target)
    steps: list[GrowthStep] = field(default_factory=list)
    note: str = ""


def _circuit(rankings: Mapping[str, Sequence[Head]], sizes: Mapping[str, int], scores=None) -> Circuit:
    groups = {}
    for g in GROUPS:
        heads = list(rankings.get(g, ()))[: sizes.get(g, 0)]
        groups[g] = tuple(Node(g, layer, head, None if scores is None else scores[g][layer][head])
                          for layer, head in heads)
    return Circuit(groups)


def grow_circuit(runner: AblationRunner, rankings: Mapping[str, Sequence[Head]], *, ceiling: Ceilings,
                 target_fraction: float = 0.9, max_steps: int = 64) -> CircuitGrowth:
    """Grow a circuit along ``rankings`` (per group, most important first) by greedy doubling until its
    faithfulness reaches ``target_fraction`` x ``ceiling.form_faithfulness``."""
    if not 0 < target_fraction <= 1:
        raise EtbenchError(f"target fraction must be in (0, 1], got {target_fraction}")
    m, z = ceiling.model.value, ceiling.no_heads.value
    target = target_fraction * ceiling.form_faithfulness
    limits = {g: len(rankings.get(g, ())) for g in GROUPS}
    sizes = {g: 0 for g in GROUPS}

    def accuracy(trial: Mapping[str, int]) -> float:
        return _acc(runner.correct(keep=_circuit(rankings, trial).kept()))

    if not math.isfinite(target) or target <= 0:
        return CircuitGrowth("greedy-doubling", target_fraction, target, False, dict(sizes), [],
                             "nothing to grow: the model or the form's ceiling scores 0 on these prompts")
    cur = accuracy(sizes)
    steps = [GrowthStep(dict(sizes), 0, cur, paper_ratio(cur, m), mib_normalised(cur, m, z), "")]
    reached = steps[-1].faithfulness >= target
    while not reached and len(steps) <= max_steps:
        best = None
        for g in GROUPS:
            nxt = min(limits[g], 1 if sizes[g] == 0 else 2 * sizes[g])
            if nxt == sizes[g]:
                continue
            trial = {**sizes, g: nxt}
            a = accuracy(trial)
            key = ((a - cur) / (nxt - sizes[g]), -(nxt - sizes[g]))
            if best is None or key > best[0]:
                best = (key, g, nxt, a)
        if best is None:
            break  # every group exhausted
        _, g, nxt, cur = best
        sizes[g] = nxt
        steps.append(GrowthStep(dict(sizes), sum(sizes.values()), cur, paper_ratio(cur, m),
                                mib_normalised(cur, m, z), g))
        reached = steps[-1].faithfulness >= target
    note = "" if reached else (f"target {target:.3f} not reached: the best step reached "
                               f"{max(s.faithfulness for s in steps):.3f} (form ceiling "
                               f"{ceiling.form_faithfulness:.3f})")
    return CircuitGrowth("greedy-doubling", target_fraction, target, reached, dict(sizes), steps, note)
