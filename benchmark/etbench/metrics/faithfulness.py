"""Mean ablation and circuit faithfulness (docs/method.md §6): circuit accuracy, random-circuit baseline,
completeness and a faithfulness curve over circuit size.

* **Circuit accuracy**: mean ablation of every head except the circuit's, at their position classes
  (``etbench.metrics.ablation`` says exactly what is meaned and with which reference prompts).
* ``faithfulness = circuit accuracy / model accuracy`` (not rounded; the paper rounded both to 2 dp).
* **Random baseline**: circuits with the same group sizes, heads drawn uniformly (without replacement
  within a group; the reference drew with replacement), mean ± sd over draws.
* **Completeness**: ``|F(M\\K) - F(C\\K)|`` for random K (each node dropped with p = 0.5) and for K = a
  whole group, where F(M\\K) ablates only K's nodes at their positions in the full model.
* **Faithfulness curve**: faithfulness of the top-k nodes (by discovery score, else proportionally per
  group in listed order) for k on a log grid, with the area under it over the fraction k/N (as MIB's
  CPR, higher is better) and the area of |1 - faithfulness| (MIB's CMD, lower is better).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from etbench.core import stats
from etbench.core.errors import EtbenchError
from etbench.core.io import atomic_write_json, jsonable
from etbench.core.progress import track
from etbench.core.stats import Proportion, proportion_ci
from etbench.mech.forward import PassCounter
from etbench.mech.heads import head_map
from etbench.metrics.ablation import AblationRunner, MeanActivations, mean_activations
from etbench.models.load import as_loaded
from etbench.schema.circuit import GROUP_CODES, GROUPS, Circuit, Node, heads_by_position
from etbench.task import prompts
from etbench.task.layout import layouts, usable_pool

SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Random circuits, completeness, curve


def random_circuit(group_sizes: Mapping[str, int], n_layers: int, n_heads: int, rng: random.Random) -> Circuit:
    """Same group sizes, heads uniform over the model (distinct within a group)."""
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    groups = {}
    for g in GROUPS:
        k = group_sizes.get(g, 0)
        if k > len(heads):
            raise EtbenchError(f"group {g} has {k} heads but the model only {len(heads)}")
        groups[g] = tuple(Node(g, layer, head) for layer, head in rng.sample(heads, k))
    return Circuit(groups, n_layers=n_layers, n_heads=n_heads, method="random")


def circuit_ranking(circuit: Circuit) -> list[Node]:
    """Nodes in importance order: by score (most negative first) when every node has one, else
    proportionally across groups in listed order (node i of a group of size m ranks at (i+1)/m)."""
    nodes = list(circuit.nodes())
    if nodes and all(n.score is not None and math.isfinite(n.score) for n in nodes):
        return sorted(nodes, key=lambda n: n.score)
    order = {g: i for i, g in enumerate(GROUPS)}
    keyed = [((i + 1) / len(circuit.groups[g]), order[g], n) for g in GROUPS for i, n in enumerate(circuit.groups[g])]
    return [n for _, _, n in sorted(keyed, key=lambda t: (t[0], t[1]))]


def log_grid(total: int) -> list[int]:
    """0, 1, 2, 4, 8, ... and total."""
    ks, k = [0], 1
    while k < total:
        ks.append(k)
        k *= 2
    if total > 0:
        ks.append(total)
    return ks


@dataclass
class CurvePoint:
    k: int
    accuracy: float
    faithfulness: float


@dataclass
class FaithfulnessCurve:
    """Faithfulness of the top-k nodes for k on a log grid (k = 0: everything ablated)."""

    points: list[CurvePoint]
    total: int
    area: float  # trapezoid area under faithfulness over k/total (MIB CPR-like; 1 = faithful at every size)
    cmd: float  # trapezoid area under |1 - faithfulness| over k/total (MIB CMD-like; 0 is best)
    ranking: str  # how nodes were ordered


def curve_areas(ks: Sequence[int], faith: Sequence[float], total: int) -> tuple[float, float]:
    if total <= 0 or len(ks) < 2:
        return float("nan"), float("nan")
    xs = [k / total for k in ks]
    area = sum((xs[i + 1] - xs[i]) * (faith[i] + faith[i + 1]) / 2 for i in range(len(xs) - 1))
    gap = [abs(1 - f) for f in faith]
    cmd = sum((xs[i + 1] - xs[i]) * (gap[i] + gap[i + 1]) / 2 for i in range(len(xs) - 1))
    return area, cmd


@dataclass
class RandomBaseline:
    group_sizes: dict[str, int]
    accuracies: list[float]
    mean: float
    sd: float
    faithfulness_mean: float
    faithfulness_sd: float
    # per draw, per item: the rows a published baseline is re-derived from (etbench.publish.rederive)
    correct: list[list[bool]] = field(default_factory=list)


@dataclass
class CompletenessDraw:
    k_size: int
    model_minus_k: float
    circuit_minus_k: float

    @property
    def score(self) -> float:
        return abs(self.model_minus_k - self.circuit_minus_k)


@dataclass
class Completeness:
    random_k: list[CompletenessDraw]
    score_mean: float
    score_sd: float
    per_group: dict[str, dict[str, float]]  # group -> {"circuit_minus_k", "model_minus_k", "score"}


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _ratio_ci(circuit_flags: Sequence[bool], model_flags: Sequence[bool], seed: int, draws: int = 2000,
              level: float = 0.95) -> tuple[float, float]:
    return stats.ratio_of_sums_ci(circuit_flags, model_flags, seed=seed, draws=draws, level=level)


# ----------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class CircuitEvaluation:
    """Everything ``etbench circuit eval`` reports for one (model, circuit)."""

    model: str
    circuit_model: str
    circuit_method: str
    group_sizes: dict[str, int]
    n_boxes: int
    n: int
    seed: int
    mean_n: int
    model_acc: Proportion
    circuit_acc: Proportion
    faithfulness: float
    faithfulness_ci: tuple[float, float]
    baseline: RandomBaseline | None = None
    completeness: Completeness | None = None
    curve: FaithfulnessCurve | None = None
    forward_passes: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    schema_version: int = SCHEMA_VERSION
    # Per-item outcomes (same items, same order), kept for paired statistics across models/circuits.
    model_correct: tuple[bool, ...] = ()
    circuit_correct: tuple[bool, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("model_acc", "circuit_acc"):
            p: Proportion = getattr(self, key)
            d[key] = {"value": p.value, "k": p.k, "n": p.n, "ci95": [p.low, p.high], "method": p.method}
        if self.completeness is not None:
            for row, draw in zip(d["completeness"]["random_k"], self.completeness.random_k):
                row["score"] = draw.score
        return jsonable(d)

    def save(self, path) -> Any:
        return atomic_write_json(path, self.to_dict())


def _acc(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def _faith(acc: float, model_acc: float) -> float:
    return acc / model_acc if model_acc > 0 else float("nan")


def evaluate_circuit(model, circuit: Circuit, tokenizer=None, *, n_boxes: int = 7, n: int = 100, seed: int = 0,
                     mean_n: int = 100, batch_size: int = 16, random_draws: int = 10, completeness_draws: int = 10,
                     curve: bool = True, ranking: Sequence[Node] | None = None, model_name: str = "",
                     mean: MeanActivations | None = None, progress: bool = False,
                     counter: PassCounter | None = None, runner: AblationRunner | None = None) -> CircuitEvaluation:
    """Faithfulness of ``circuit`` on ``model`` (a loaded model, a ``LoadedModel`` or a registry ref).

    ``n`` evaluation prompts (the seeded canonical stream), ``mean_n`` mean-ablation prompts;
    ``random_draws`` random circuits; ``completeness_draws`` random K (0 skips completeness).
    ``runner`` (from ``evaluation_runner``, same model, prompts and mean) lets several circuits share
    the model's flags and the stored base runs."""
    t0 = time.perf_counter()
    model, tokenizer, model_name = as_loaded(model, tokenizer, model_name)
    hm = head_map(model)
    circuit.check_model(hm.spec)
    if runner is None:
        runner = evaluation_runner(model, tokenizer, n_boxes, n, seed, mean_n, batch_size, mean, counter, progress)
    elif (runner.n_boxes, len(runner.lays), runner.seed) != (n_boxes, n, seed) or runner.model is not model:
        raise EtbenchError("evaluate_circuit: the runner was built for other prompts or another model")
    counter = runner.counter or PassCounter()
    before = counter.as_dict()  # a shared runner's counter also holds other evaluations' passes
    mean = runner.mean
    steps = 2 + random_draws + (2 * completeness_draws + 2 * len(GROUPS) if completeness_draws else 0)
    todo: list[tuple[str, Any]] = [("model", None), ("circuit", circuit)]
    rng = random.Random(f"etbench:random-circuits:{seed}")
    for _ in range(random_draws):
        todo.append(("random", random_circuit(circuit.group_sizes, hm.spec.n_layers, hm.spec.n_heads, rng)))
    krng = random.Random(f"etbench:completeness:{seed}")
    ks = []
    for _ in range(completeness_draws):
        ks.append([nd for nd in circuit.nodes() if krng.random() < 0.5])
    ranked = list(ranking) if ranking is not None else circuit_ranking(circuit)
    grid = log_grid(len(ranked)) if curve else []
    steps += len(grid)
    bar = iter(track(range(steps), f"circuit eval ({circuit.size} nodes)", total=steps, enabled=progress))

    def step(flags_fn):
        next(bar, None)
        return flags_fn()

    model_flags = step(lambda: runner.correct())
    circ_flags = step(lambda: runner.correct(keep=circuit.kept()))
    model_acc, circ_acc = _acc(model_flags), _acc(circ_flags)

    baseline = None
    if random_draws:
        flags = [list(step(lambda c=c: runner.correct(keep=c.kept()))) for _, c in todo[2:]]
        accs = [_acc(f) for f in flags]
        m, sd = _mean_sd(accs)
        fm, fsd = _mean_sd([_faith(a, model_acc) for a in accs])
        baseline = RandomBaseline(circuit.group_sizes, accs, m, sd, fm, fsd, [[bool(x) for x in f] for f in flags])

    completeness = None
    if completeness_draws:
        draws = []
        for k_nodes in ks:
            m_k = _acc(step(lambda: runner.correct(ablate=heads_by_position(k_nodes))))
            c_k = _acc(step(lambda: runner.correct(keep=circuit.without(k_nodes).kept())))
            draws.append(CompletenessDraw(len(k_nodes), m_k, c_k))
        per_group = {}
        for g in GROUPS:
            k_nodes = list(circuit.groups[g])
            m_k = _acc(step(lambda: runner.correct(ablate=heads_by_position(k_nodes))))
            c_k = _acc(step(lambda: runner.correct(keep=circuit.without(k_nodes).kept())))
            per_group[g] = {"model_minus_k": m_k, "circuit_minus_k": c_k, "score": abs(m_k - c_k)}
        sm, ssd = _mean_sd([d.score for d in draws])
        completeness = Completeness(draws, sm, ssd, per_group)

    curve_result = None
    if curve and ranked:
        points = []
        for k in grid:
            sub = _circuit_of(ranked[:k], circuit)
            acc = _acc(step(lambda: runner.correct(keep=sub.kept())))
            points.append(CurvePoint(k, acc, _faith(acc, model_acc)))
        area, cmd = curve_areas([p.k for p in points], [p.faithfulness for p in points], len(ranked))
        how = "given ranking" if ranking is not None else (
            "by score" if all(n.score is not None for n in ranked) else "proportional per group, listed order")
        curve_result = FaithfulnessCurve(points, len(ranked), area, cmd, how)
    for _ in bar:
        pass

    return CircuitEvaluation(
        model=model_name, circuit_model=circuit.model, circuit_method=circuit.method,
        group_sizes=circuit.group_sizes, n_boxes=n_boxes, n=n, seed=seed, mean_n=mean.n_prompts,
        model_acc=proportion_ci(sum(model_flags), len(model_flags)),
        circuit_acc=proportion_ci(sum(circ_flags), len(circ_flags)),
        faithfulness=_faith(circ_acc, model_acc), faithfulness_ci=_ratio_ci(circ_flags, model_flags, seed),
        baseline=baseline, completeness=completeness, curve=curve_result, forward_passes={k: v - before[k] for k, v in counter.as_dict().items()},
        wall_s=time.perf_counter() - t0,
        model_correct=tuple(bool(x) for x in model_flags), circuit_correct=tuple(bool(x) for x in circ_flags),
    )


def evaluation_runner(model, tokenizer, n_boxes: int = 7, n: int = 100, seed: int = 0, mean_n: int = 100,
                      batch_size: int = 16, mean: MeanActivations | None = None, counter: PassCounter | None = None,
                      progress: bool = False, reuse_prefix: bool = True,
                      wording: str = prompts.DEFAULT_WORDING) -> AblationRunner:
    """The ``AblationRunner`` over ``evaluate_circuit``'s prompts (``n`` seeded canonical prompts with
    ``n_boxes`` boxes, in ``wording``), computing the mean activations (in the same wording) unless given."""
    hm = head_map(model)
    counter = counter if counter is not None else PassCounter()
    pool, labels = usable_pool(tokenizer, n_boxes)
    lays = layouts(prompts.generate(n_boxes=n_boxes, n=n, seed=seed, objects=pool, labels=labels, wording=wording),
                   tokenizer)
    mean = mean.require(mean_n, n_boxes, seed, "evaluation_runner") if mean is not None else mean_activations(model, tokenizer, hm, n_boxes, mean_n, seed, batch_size, pool, labels,
                                    counter=counter, progress=progress, wording=wording)
    return AblationRunner(model, hm, lays, mean, batch_size, counter, reuse_prefix, n_boxes=n_boxes, seed=seed)


def _circuit_of(nodes: Sequence[Node], like: Circuit) -> Circuit:
    groups = {g: [n for n in nodes if n.group == g] for g in GROUPS}
    return Circuit(groups, model=like.model, method=like.method)


def format_evaluation(ev: CircuitEvaluation) -> str:
    """A human-readable table of a ``CircuitEvaluation``; a ratio that is not a number (a model at 0 accuracy: the
    curve's area, faithfulness) reads "undefined", not ``nan``."""
    from tabulate import tabulate

    def num(x: float, digits: int = 3) -> str:
        return f"{x:.{digits}f}" if math.isfinite(x) else "undefined"

    sizes = ", ".join(f"{GROUP_CODES[g]} {k}" for g, k in ev.group_sizes.items())
    rows = [
        ["model accuracy", num(ev.model_acc.value), f"[{num(ev.model_acc.low)}, {num(ev.model_acc.high)}]"],
        ["circuit accuracy", num(ev.circuit_acc.value), f"[{num(ev.circuit_acc.low)}, {num(ev.circuit_acc.high)}]"],
        ["faithfulness", num(ev.faithfulness), f"[{num(ev.faithfulness_ci[0])}, {num(ev.faithfulness_ci[1])}]"],
    ]
    if ev.baseline:
        b = ev.baseline
        rows.append([f"random circuit ({len(b.accuracies)} draws)", f"{num(b.mean)} ± {num(b.sd)}",
                     f"faithfulness {num(b.faithfulness_mean)} ± {num(b.faithfulness_sd)}"])
    if ev.completeness:
        c = ev.completeness
        rows.append([f"completeness |F(M\\K)-F(C\\K)| (random K, {len(c.random_k)})",
                     f"{num(c.score_mean)} ± {num(c.score_sd)}", "lower is better"])
        for g, v in c.per_group.items():
            rows.append([f"  K = group {GROUP_CODES[g]}", num(v['score']),
                         f"C\\K {num(v['circuit_minus_k'])} / M\\K {num(v['model_minus_k'])}"])
    if ev.curve:
        cv = ev.curve
        pts = " ".join(f"{p.k}:{num(p.faithfulness, 2)}" for p in cv.points)
        rows.append(["faithfulness curve area (CPR-like)", num(cv.area), f"CMD {num(cv.cmd)}; k:F {pts}"])
    head = (f"model: {ev.model}   circuit: {ev.circuit_model or '?'} ({ev.circuit_method}; {sizes})\n"
            f"{ev.n} prompts, {ev.n_boxes} boxes, seed {ev.seed}; mean over {ev.mean_n} random-query prompts; "
            f"{ev.forward_passes.get('calls', 0)} forward passes, {ev.wall_s:.1f} s")
    return head + "\n" + tabulate(rows, headers=["", "value", "95% CI / detail"], tablefmt="github")
