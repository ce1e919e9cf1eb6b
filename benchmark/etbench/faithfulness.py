"""Mean ablation and circuit faithfulness (spec §7): circuit accuracy, random-circuit baseline,
completeness and a faithfulness curve over circuit size.

* **Mean activations**: the position-wise mean of every head's ``z`` over prompts whose query letter
  is a uniformly random letter (one prompt per fresh context, queried at segment 0, as in the paper's
  500 ablation prompts). Prompts of one tokenizer normally share one length; if they do not, the mean
  at position t is over the prompts that reach t (left-aligned), which equals the paper's mean when
  lengths agree.
* **Circuit accuracy**: every head's z is replaced by the mean at every position, except circuit heads
  at their group's position class (A, B at the last token; C at the query label; D at the query label's
  earlier copy). Positions outside the three classes are meaned for all heads. MLPs and embeddings are
  never touched. Accuracy is the paper's full-vocabulary top-1.
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
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from .circuits import GROUP_CODES, GROUPS, Circuit, Node, heads_by_position
from .data import LABELS, Example, paper_objects, sample_context, stream_rng
from .errors import EtbenchError
from .heads import HeadMap, head_map
from .interventions import Edit, cache, replace_where, run, Site
from .layout import POSITION_CLASSES, Layout, layouts, pad_batch, pad_id_of, usable_pool
from .progress import track
from .stats import Proportion, proportion_ci

SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Cost accounting


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


def _device(model) -> torch.device:
    return next(model.parameters()).device


def forward(model, input_ids: torch.Tensor, hm: HeadMap | None = None, edits: Sequence[Edit] = (),
            counter: PassCounter | None = None, last_only: bool = True, **kwargs):
    """One (optionally edited) forward pass; counted; ``logits_to_keep=1`` when only the last logits
    are needed and the model accepts it."""
    if counter is not None:
        counter.add(input_ids)
    inputs = {"input_ids": input_ids.to(_device(model))}
    extra = {"logits_to_keep": 1} if last_only else {}
    try:  # through interventions.run even without edits: the forward backend in force runs it
        return run(model, hm, inputs, edits, **extra, **kwargs)
    except TypeError as err:
        if not extra or "logits_to_keep" not in str(err):
            raise
        return run(model, hm, inputs, edits, **kwargs)


# ----------------------------------------------------------------------------------------------
# Mean activations


def ablation_examples(n_boxes: int = 7, n: int = 500, seed: int = 0, objects: Sequence[str] | None = None,
                      labels: Sequence[str] = LABELS) -> list[Example]:
    """The mean-ablation prompts (spec §2.4): one fresh context each, queried at segment 0, with the
    query letter replaced by a uniformly random letter (usually absent from the context)."""
    objects = tuple(paper_objects() if objects is None else objects)
    rng = stream_rng("ablation", seed, n_boxes)
    out = []
    for i in range(n):
        ctx = sample_context(rng, n_boxes, objects, tuple(labels), context_id=i)
        out.append(replace(ctx, query_label=rng.choice(tuple(labels))))
    return out


@dataclass
class MeanActivations:
    """Position-wise mean z of every head: ``z[layer]`` is ``[S, n_heads, d_head]``."""

    z: list[torch.Tensor]
    counts: torch.Tensor  # [S] prompts that reached each position
    n_prompts: int
    n_boxes: int
    seed: int

    @property
    def length(self) -> int:
        return int(self.counts.shape[0])


@torch.no_grad()
def mean_activations(model, tokenizer, hm: HeadMap | None = None, n_boxes: int = 7, n: int = 500, seed: int = 0,
                     batch_size: int = 16, objects: Sequence[str] | None = None, labels: Sequence[str] = LABELS,
                     counter: PassCounter | None = None, progress: bool = False) -> MeanActivations:
    """Mean z over ``ablation_examples`` (right-padded batches; padding never counts)."""
    hm = hm or head_map(model)
    lays = layouts(ablation_examples(n_boxes, n, seed, objects, labels), tokenizer)
    spec = hm.spec
    width = max(lay.length for lay in lays)
    sums = [torch.zeros(width, spec.n_heads, spec.d_head, dtype=torch.float64) for _ in range(spec.n_layers)]
    counts = torch.zeros(width, dtype=torch.float64)
    chunks = [lays[i: i + batch_size] for i in range(0, len(lays), batch_size)]
    for chunk in track(chunks, "mean activations", total=len(chunks), enabled=progress):
        batch = pad_batch(chunk, pad_id_of(tokenizer), "right")
        if counter is not None:
            counter.add(batch.input_ids)
        dev = _device(model)
        store = cache(model, hm, {"input_ids": batch.input_ids.to(dev), "attention_mask": batch.attention_mask.to(dev)},
                      [Site(layer) for layer in range(spec.n_layers)], logits_to_keep=1)
        mask = batch.attention_mask.to(torch.float64)  # [B, S]
        s = mask.shape[1]
        counts[:s] += mask.sum(0)
        for layer in range(spec.n_layers):
            sums[layer][:s] += torch.einsum("bs,bshd->shd", mask, store[(layer, "z")].cpu().to(torch.float64))
    z = [(total / counts.clamp(min=1)[:, None, None]).to(next(model.parameters()).dtype) for total in sums]
    return MeanActivations(z, counts, n, n_boxes, seed)


# ----------------------------------------------------------------------------------------------
# Mean-ablated forward passes


HeadSets = Mapping[str, set[tuple[int, int]]]  # position class -> {(layer, head)}


def _class_positions(lays: Sequence[Layout], position_class: str) -> list[int | None]:
    return [getattr(lay, position_class) for lay in lays]


def ablation_edits(hm: HeadMap, mean: MeanActivations, lays: Sequence[Layout], *, keep: HeadSets | None = None,
                   ablate: HeadSets | None = None, shift: int = 0) -> list[Edit]:
    """Mean-ablation edits for one batch of equal-length, unpadded prompts.

    ``keep`` (circuit mode): every head is meaned at every position except the listed heads at their
    position class. ``ablate`` (knock-out mode): only the listed heads at their position class are
    meaned. Exactly one of the two must be given. ``shift``: the edits cover positions ``shift..last``
    only, given relative to ``shift`` (a run on a key/value prefix of ``shift`` tokens)."""
    if (keep is None) == (ablate is None):
        raise EtbenchError("ablation_edits: give exactly one of keep= or ablate=")
    spec = hm.spec
    seq = lays[0].length
    if any(lay.length != seq for lay in lays):
        raise EtbenchError("ablation_edits: prompts of one batch must share one length")
    if seq > mean.length:
        raise EtbenchError(f"prompts have {seq} tokens but the mean activations cover only {mean.length} "
                           "(compute them on prompts with as many boxes)")
    listed = keep if keep is not None else ablate
    by_layer: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for pc, heads in listed.items():
        if pc not in POSITION_CLASSES:
            raise EtbenchError(f"unknown position class {pc!r}")
        for layer, head in heads:
            by_layer[layer].append((pc, head))
    positions = {pc: _class_positions(lays, pc) for pc in POSITION_CLASSES}
    edits = []
    layers = range(spec.n_layers) if keep is not None else sorted(by_layer)
    for layer in layers:
        mask = torch.zeros(len(lays), seq - shift, spec.n_heads, dtype=torch.bool)
        for pc, head in by_layer.get(layer, ()):
            for row, pos in enumerate(positions[pc]):
                if pos is None:
                    raise EtbenchError(f"a prompt has no {pc} position (is its query label in the context?)")
                if pos < shift:
                    raise EtbenchError(f"ablation_edits: a {pc} head sits at position {pos}, before the shift {shift}")
                mask[row, pos - shift, head] = True
        keep_mask = mask if keep is not None else ~mask
        edits.append(replace_where(layer, "z", mean.z[layer][shift:seq], keep_mask))
    return edits


def _heads_key(sets: HeadSets | None) -> frozenset:
    return frozenset((pc, layer, head) for pc, heads in (sets or {}).items() for layer, head in heads)


class AblationRunner:
    """Mean-ablated forward passes over one prompt set, each computing only the tokens it can change.

    Circuit mode (``keep``): before a row's earliest kept position every head is meaned whatever the
    circuit, so those tokens come from one stored all-meaned run (``prefix.PatchRunner``); random
    circuits, curve points and completeness then run only the rest of the prompt. Knock-out mode
    (``ablate``) reuses the clean run the same way. Results are memoised per head set, so the model's
    own flags or a circuit evaluated twice cost nothing the second time. ``reuse_prefix=False`` runs
    whole prompts (one forward per batch, no base runs); both paths agree to float precision."""

    def __init__(self, model, hm: HeadMap, lays: Sequence[Layout], mean: MeanActivations | None,
                 batch_size: int = 16, counter: PassCounter | None = None, reuse_prefix: bool = True,
                 n_boxes: int | None = None, seed: int | None = None, max_splits: int = 4) -> None:
        self.model, self.hm, self.lays, self.mean = model, hm, list(lays), mean
        self.max_splits = max_splits
        self.n_boxes, self.seed = n_boxes, seed  # what the prompts were generated from, when known
        self.batch_size, self.counter, self.reuse_prefix = batch_size, counter, reuse_prefix
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, lay in enumerate(self.lays):
            by_length[lay.length].append(i)
        self._groups = list(by_length.values())
        self._runners: dict[tuple[int, str], Any] = {}
        self._memo: dict[tuple[str, frozenset], list[bool]] = {}

    def _runner(self, gi: int, base: str):
        from .prefix import PatchRunner

        if (gi, base) not in self._runners:
            sub = [self.lays[i] for i in self._groups[gi]]
            meaned = None if base == "clean" else (
                lambda rows: ablation_edits(self.hm, self.mean, [sub[r] for r in rows.tolist()], keep={}))
            self._runners[(gi, base)] = PatchRunner(
                self.model, torch.tensor([lay.input_ids for lay in sub]), self.batch_size, base_edits=meaned,
                counter=self.counter, description=f"{base} runs")
        return self._runners[(gi, base)]

    @torch.no_grad()
    def correct(self, keep: HeadSets | None = None, ablate: HeadSets | None = None) -> list[bool]:
        """Per prompt: is the top-1 next token the answer, under the given mean ablation (none when both
        ``keep`` and ``ablate`` are None: the full model)."""
        mode = "keep" if keep is not None else "ablate" if ablate is not None else "none"
        key = (mode, _heads_key(keep if keep is not None else ablate))
        if key not in self._memo:
            if mode != "none" and self.mean is None:
                raise EtbenchError("mean ablation needs mean activations")
            self._memo[key] = self._run(keep, ablate) if self.reuse_prefix else self._run_whole(keep, ablate)
        return list(self._memo[key])

    def _run_whole(self, keep, ablate) -> list[bool]:
        correct = [False] * len(self.lays)
        for idx in self._groups:
            for s in range(0, len(idx), self.batch_size):
                chunk = [self.lays[i] for i in idx[s: s + self.batch_size]]
                edits = [] if keep is None and ablate is None else ablation_edits(
                    self.hm, self.mean, chunk, keep=keep, ablate=ablate)
                out = forward(self.model, torch.tensor([lay.input_ids for lay in chunk]), self.hm, edits, self.counter)
                for lay, i, t in zip(chunk, idx[s: s + self.batch_size], out.logits[:, -1].argmax(-1).tolist()):
                    correct[i] = t == lay.target_id
        return correct

    def _run(self, keep, ablate) -> list[bool]:
        listed = keep if keep is not None else ablate
        classes = [pc for pc, heads in (listed or {}).items() if heads]
        correct = [False] * len(self.lays)
        for gi, idx in enumerate(self._groups):
            sub = [self.lays[i] for i in idx]
            runner = self._runner(gi, "meaned" if keep is not None else "clean")
            if not classes:  # the base run itself: everything meaned, or the clean model
                pred = runner.base_argmax.tolist()
            else:
                # a row's edits can change nothing before its earliest listed position
                starts = torch.tensor([min(getattr(lay, pc) for pc in classes) for lay in sub])
                pred = []
                # a chunk splits into up to max_splits runs by start, so chunks of batch_size x
                # max_splits rows keep runs near batch_size (measured on tiny-base: 16 x 4 rows took
                # 16-22% less time, in two runs, than 16 rows in up to 8 runs)
                chunk = self.batch_size * self.max_splits
                for s in range(0, len(sub), chunk):
                    rows = torch.arange(s, min(s + chunk, len(sub)))

                    def edits(part: torch.Tensor, shift: int, rows=rows):
                        part_lays = [sub[r] for r in rows[part].tolist()]
                        return ablation_edits(self.hm, self.mean, part_lays, keep=keep, ablate=ablate, shift=shift)

                    logits = runner.logits(rows, runner.kv(rows), starts[rows], edits, self.max_splits)
                    pred += logits.argmax(-1).tolist()
            for i, lay, t in zip(idx, sub, pred):
                correct[i] = t == lay.target_id
        return correct


def ablated_correct(model, hm: HeadMap, lays: Sequence[Layout], mean: MeanActivations | None, *,
                    keep: HeadSets | None = None, ablate: HeadSets | None = None, batch_size: int = 16,
                    counter: PassCounter | None = None) -> list[bool]:
    """Per prompt: is the top-1 next token the answer, under the given mean ablation (none when both
    ``keep`` and ``ablate`` are None: the full model). One pass over whole prompts; for many ablations
    of the same prompts use an ``AblationRunner``."""
    return AblationRunner(model, hm, lays, mean, batch_size, counter, reuse_prefix=False).correct(keep, ablate)


def circuit_correct(model, hm, lays, mean, circuit: Circuit, batch_size: int = 16,
                    counter: PassCounter | None = None) -> list[bool]:
    """Per-prompt correctness of the circuit with everything else mean-ablated."""
    circuit.check_model(hm.spec)
    return ablated_correct(model, hm, lays, mean, keep=circuit.kept(), batch_size=batch_size, counter=counter)


def _acc(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


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
    """Paired percentile bootstrap CI of sum(circuit)/sum(model) over items."""
    import numpy as np

    c = np.asarray(circuit_flags, dtype=float)
    m = np.asarray(model_flags, dtype=float)
    if len(c) == 0 or m.sum() == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), size=(draws, len(c)))
    num, den = c[idx].sum(1), m[idx].sum(1)
    ratios = num[den > 0] / den[den > 0]
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


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
        from .circuits import _jsonable

        d = asdict(self)
        for key in ("model_acc", "circuit_acc"):
            p: Proportion = getattr(self, key)
            d[key] = {"value": p.value, "k": p.k, "n": p.n, "ci95": [p.low, p.high], "method": p.method}
        if self.completeness is not None:
            for row, draw in zip(d["completeness"]["random_k"], self.completeness.random_k):
                row["score"] = draw.score
        return _jsonable(d)

    def save(self, path) -> Any:
        from .fileio import atomic_write_json

        return atomic_write_json(path, self.to_dict())


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
    model, tokenizer, model_name = _resolve_model(model, tokenizer, model_name)
    hm = head_map(model)
    circuit.check_model(hm.spec)
    if runner is None:
        runner = evaluation_runner(model, tokenizer, n_boxes, n, seed, mean_n, batch_size, mean, counter, progress)
    elif (runner.n_boxes, len(runner.lays), runner.seed) != (n_boxes, n, seed) or runner.model is not model:
        raise EtbenchError("evaluate_circuit: the runner was built for other prompts or another model")
    counter = runner.counter or PassCounter()
    before = counter.as_dict()  # a shared runner's counter also holds other evaluations' passes
    mean, lays = runner.mean, runner.lays
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
        accs = [_acc(step(lambda c=c: runner.correct(keep=c.kept()))) for _, c in todo[2:]]
        m, sd = _mean_sd(accs)
        fm, fsd = _mean_sd([_faith(a, model_acc) for a in accs])
        baseline = RandomBaseline(circuit.group_sizes, accs, m, sd, fm, fsd)

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
                      progress: bool = False, reuse_prefix: bool = True) -> AblationRunner:
    """The ``AblationRunner`` over ``evaluate_circuit``'s prompts (``n`` seeded canonical prompts with
    ``n_boxes`` boxes), computing the mean activations unless given."""
    from . import data

    hm = head_map(model)
    counter = counter if counter is not None else PassCounter()
    pool, labels = usable_pool(tokenizer, n_boxes)
    lays = layouts(data.generate(n_boxes=n_boxes, n=n, seed=seed, objects=pool, labels=labels), tokenizer)
    mean = mean or mean_activations(model, tokenizer, hm, n_boxes, mean_n, seed, batch_size, pool, labels,
                                    counter=counter, progress=progress)
    return AblationRunner(model, hm, lays, mean, batch_size, counter, reuse_prefix, n_boxes=n_boxes, seed=seed)


def _circuit_of(nodes: Sequence[Node], like: Circuit) -> Circuit:
    groups = {g: [n for n in nodes if n.group == g] for g in GROUPS}
    return Circuit(groups, model=like.model, method=like.method)


def _resolve_model(model, tokenizer, model_name: str):
    """(torch model, tokenizer, name) from a torch model + tokenizer, a LoadedModel, or a registry ref."""
    if isinstance(model, str):
        from . import models

        name = model_name or model
        loaded = models.load(model)
        return loaded.model, loaded.tokenizer, name
    if hasattr(model, "tokenizer") and hasattr(model, "model") and not isinstance(model, torch.nn.Module):
        return model.model, tokenizer or model.tokenizer, model_name or getattr(model, "ref", "")
    if tokenizer is None:
        raise EtbenchError("evaluate_circuit: pass the tokenizer with a bare model")
    return model, tokenizer, model_name or getattr(getattr(model, "config", None), "name_or_path", "") or ""


def format_evaluation(ev: CircuitEvaluation) -> str:
    """A human-readable table of a ``CircuitEvaluation``."""
    from tabulate import tabulate

    sizes = ", ".join(f"{GROUP_CODES[g]} {k}" for g, k in ev.group_sizes.items())
    rows = [
        ["model accuracy", f"{ev.model_acc.value:.3f}", f"[{ev.model_acc.low:.3f}, {ev.model_acc.high:.3f}]"],
        ["circuit accuracy", f"{ev.circuit_acc.value:.3f}", f"[{ev.circuit_acc.low:.3f}, {ev.circuit_acc.high:.3f}]"],
        ["faithfulness", f"{ev.faithfulness:.3f}", f"[{ev.faithfulness_ci[0]:.3f}, {ev.faithfulness_ci[1]:.3f}]"],
    ]
    if ev.baseline:
        b = ev.baseline
        rows.append([f"random circuit ({len(b.accuracies)} draws)", f"{b.mean:.3f} ± {b.sd:.3f}",
                     f"faithfulness {b.faithfulness_mean:.3f} ± {b.faithfulness_sd:.3f}"])
    if ev.completeness:
        c = ev.completeness
        rows.append([f"completeness |F(M\\K)-F(C\\K)| (random K, {len(c.random_k)})", f"{c.score_mean:.3f} ± {c.score_sd:.3f}",
                     "lower is better"])
        for g, v in c.per_group.items():
            rows.append([f"  K = group {GROUP_CODES[g]}", f"{v['score']:.3f}",
                         f"C\\K {v['circuit_minus_k']:.3f} / M\\K {v['model_minus_k']:.3f}"])
    if ev.curve:
        cv = ev.curve
        pts = " ".join(f"{p.k}:{p.faithfulness:.2f}" for p in cv.points)
        rows.append(["faithfulness curve area (CPR-like)", f"{cv.area:.3f}", f"CMD {cv.cmd:.3f}; k:F {pts}"])
    head = (f"model: {ev.model}   circuit: {ev.circuit_model or '?'} ({ev.circuit_method}; {sizes})\n"
            f"{ev.n} prompts, {ev.n_boxes} boxes, seed {ev.seed}; mean over {ev.mean_n} random-query prompts; "
            f"{ev.forward_passes.get('calls', 0)} forward passes, {ev.wall_s:.1f} s")
    return head + "\n" + tabulate(rows, headers=["", "value", "95% CI / detail"], tablefmt="github")
