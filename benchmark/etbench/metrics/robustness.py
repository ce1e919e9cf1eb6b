"""A row's template robustness and model-diffing view (docs/method.md §14-15): the ``robustness.json`` file
beside a leaderboard row's scorecard, its per-item rows, and the summary every reader re-derives from them.

No torch here (the leaderboard build reads these files); ``metrics.robustness_run`` runs the models.

What a file holds, per wording of ``task.prompts.WORDINGS`` (the paper's, then two held out from every
fine-tune), for the base with the base circuit and the fine-tune with its own circuit (the row's committed
circuits): each item's unablated and circuit-only (mean-ablated, §6) correctness; and the diffing rows of the
pair (per-prompt residual differences, per-head z differences and weight deltas, §15). The summary:

* accuracy per wording and model (Wilson CI), and against the paper's wording on the same items (paired);
* the fine-tune's gain over the base per wording (paired bootstrap CI, exact McNemar p);
* each circuit's faithfulness per wording (circuit / model accuracy, paired percentile bootstrap CI);
* the **robustness figures**: ``carryover`` (per circuit) = its faithfulness pooled over the held-out wordings
  minus its faithfulness on the paper's wording, and ``gain_carryover`` = the fine-tune's mean gain over the
  base on the held-out wordings minus its gain on the paper's. Differences, not ratios: both are 0 when the
  held-out wordings behave as the paper's, their CIs stay finite when a gain is near 0, and a model against
  its own copy gives ``gain_carryover`` exactly 0. CIs: percentile bootstrap over items, one resample of item
  indices for every wording and model (the wordings share contexts and queries, so items pair across them);
* the diffing summary: per layer and position class the mean relative residual difference (CI over prompts),
  and per head group of the base circuit against the heads in no group, the mean relative weight change and
  rank per projection and the mean relative ``z`` difference at the group's position (CIs over heads).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from etbench.core.errors import EtbenchError
from etbench.core.io import (
    Writer,
    atomic_write_json,
    claimed,
    dumps_json,
    jsonable,
    manifest_bytes,
    read_json,
    refuse_foreign_files,
)
from etbench.core.stats import (
    Estimate,
    bootstrap_mean,
    format_estimate_of,
    format_p,
    mcnemar,
    paired_bootstrap,
    proportion_ci,
    to_estimate,
)
from etbench.schema import scorecard as sc
from etbench.schema.circuit import GROUP_CODES, GROUP_POSITION, GROUPS, POSITION_CLASSES
from etbench.task.prompts import DEFAULT_WORDING, WORDINGS

SCHEMA_VERSION = 1
FORMAT = "etbench-robustness"
FILE_NAME = "robustness.json"
ROBUSTNESS_WRITER = Writer("etbench robustness", ".etbench-robustness-manifest.json")
MODELS = ("base", "ft")
#: The projections of a head's weight change (``mech.heads.HEAD_TENSORS``; ``z`` = the output projection's
#: columns that read the head).
WEIGHT_KINDS = ("q", "k", "v", "z")
N_RESAMPLES = 2000
TOL = 1e-9
OTHER = "other"  # the heads in no group of the base circuit


# ---------------------------------------------------------------------------------------------
# The rows (what was measured) and the summary (what is shown)
# ---------------------------------------------------------------------------------------------

@dataclass
class WordingItems:
    """One model with its own circuit in one wording: per item, in item order (the same contexts and queries in
    every wording)."""

    wording: str
    model: str  # "base" (with the base circuit) or "ft" (with the fine-tune's circuit)
    model_correct: list[bool]
    circuit_correct: list[bool]  # every head outside the circuit mean-ablated (the mean taken in this wording)


@dataclass
class DiffItems:
    """The diffing rows (``metrics.diffing.ModelDiff``) on the first ``n`` paper-wording items."""

    n: int
    residual: dict[str, list[list[float]]]  # position class -> [layer][prompt] ||h_ft - h_base|| / ||h_base||
    heads: dict[str, list[list[float]]]  # position class -> [layer][head] mean relative z difference
    weight_delta: dict[str, list[list[float]]]  # q/k/v/z -> [layer][head or KV head] ||ΔW|| / ||W_base||
    weight_rank: dict[str, list[list[int]]]


@dataclass
class AccuracyRow:
    wording: str
    model: str
    accuracy: Estimate  # Wilson
    vs_paper: Optional[Estimate]  # this wording minus the paper's, same items (paired bootstrap); None on the paper's
    vs_paper_p: Optional[float]  # exact McNemar


@dataclass
class GainRow:
    wording: str
    gain: Estimate  # ft - base accuracy on the same items (paired bootstrap)
    mcnemar_p: float


@dataclass
class FaithfulnessRow:
    wording: str
    model: str  # the circuit is the model's own
    circuit_accuracy: Estimate
    faithfulness: Estimate  # circuit / model accuracy (paired percentile bootstrap, ratio of sums)


@dataclass
class GroupDiff:
    """A head group of the base circuit (or the heads in no group) in the diffing view."""

    group: str  # a group name, or "other"
    position: str  # the position class its z difference is read at
    heads: int
    z_difference: Estimate  # mean over the heads of their mean relative z difference (CI over heads)
    weight_delta: dict[str, Estimate]  # per projection: mean relative weight change over the heads (CI over heads)
    weight_rank: dict[str, Estimate]  # per projection: mean rank of the change (CI over heads)


@dataclass
class RobustnessSummary:
    accuracy: list[AccuracyRow]
    gain: list[GainRow]
    faithfulness: list[FaithfulnessRow]
    carryover: dict[str, Estimate]  # "base"/"ft": held-out-wording faithfulness minus the paper wording's
    gain_carryover: Estimate  # mean held-out-wording gain minus the paper wording's gain
    residual: dict[str, list[Estimate]]  # position class -> per layer
    groups: list[GroupDiff]

    def pick_accuracy(self, wording: str, model: str) -> AccuracyRow:
        return next(r for r in self.accuracy if r.wording == wording and r.model == model)

    def pick_faithfulness(self, wording: str, model: str) -> FaithfulnessRow:
        return next(r for r in self.faithfulness if r.wording == wording and r.model == model)


@dataclass
class Robustness:
    """``robustness.json``: a row's rows and their summary."""

    row: str
    base: str
    ft: str
    scorecard_sha256: str  # the scorecard whose models, circuits and seed were used
    seed: int
    n_boxes: int
    n: int  # items per wording and model
    mean_n: int  # mean-ablation prompts per held-out wording and model
    paper_mean_n: int  # the scorecard's: its paper-wording rows are the card's own faithfulness items
    wordings: list[str]
    circuits: dict[str, dict[str, list[list[int]]]]  # "base"/"ft" -> the card's heads per group
    items: list[WordingItems]
    diff: DiffItems
    summary: RobustnessSummary
    wall_s: dict[str, float] = field(default_factory=dict)  # what each part took (not a published number)

    def flags(self, wording: str, model: str) -> WordingItems:
        for r in self.items:
            if r.wording == wording and r.model == model:
                return r
        raise EtbenchError(f"{FILE_NAME}: no rows for {model} in the {wording!r} wording")

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"format": FORMAT, "schema_version": SCHEMA_VERSION, **asdict(self)})

    @classmethod
    def from_dict(cls, data: Any, where: str = FILE_NAME) -> Robustness:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EtbenchError(f"{where}: not an {FORMAT} file")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise EtbenchError(f"{where}: schema version {data.get('schema_version')!r}, this etbench reads "
                               f"{SCHEMA_VERSION}")
        try:
            d = data["diff"]
            diff = DiffItems(int(d["n"]), _float_table(d["residual"]), _float_table(d["heads"]),
                             _float_table(d["weight_delta"]),
                             {k: [[int(x) for x in r] for r in rows] for k, rows in d["weight_rank"].items()})
            items = [WordingItems(str(r["wording"]), str(r["model"]), _bools(r["model_correct"]),
                                  _bools(r["circuit_correct"])) for r in data["items"]]
            return cls(str(data["row"]), str(data["base"]), str(data["ft"]), str(data["scorecard_sha256"]),
                       int(data["seed"]), int(data["n_boxes"]), int(data["n"]), int(data["mean_n"]),
                       int(data["paper_mean_n"]),
                       [str(w) for w in data["wordings"]],
                       {m: {g: [[int(x) for x in h] for h in hs] for g, hs in c.items()}
                        for m, c in data["circuits"].items()},
                       items, diff, summary_from_dict(data["summary"]),
                       {str(k): float(v) for k, v in data.get("wall_s", {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise EtbenchError(f"{where}: malformed {FORMAT} file ({type(err).__name__}: {err})") from None


def _bools(xs: Any) -> list[bool]:
    if not isinstance(xs, list) or not all(isinstance(x, bool) for x in xs):
        raise TypeError("per-item correctness must be a list of true/false")
    return list(xs)


def _float_table(table: Mapping[str, Any]) -> dict[str, list[list[float]]]:
    return {k: [[float(x) for x in r] for r in rows] for k, rows in table.items()}


def _est(d: Mapping[str, Any]) -> Estimate:
    return Estimate(**d)


def _opt_est(d: Optional[Mapping[str, Any]]) -> Optional[Estimate]:
    return None if d is None else _est(d)


def summary_from_dict(d: Mapping[str, Any]) -> RobustnessSummary:
    return RobustnessSummary(
        [AccuracyRow(r["wording"], r["model"], _est(r["accuracy"]), _opt_est(r["vs_paper"]), r["vs_paper_p"])
         for r in d["accuracy"]],
        [GainRow(r["wording"], _est(r["gain"]), r["mcnemar_p"]) for r in d["gain"]],
        [FaithfulnessRow(r["wording"], r["model"], _est(r["circuit_accuracy"]), _est(r["faithfulness"]))
         for r in d["faithfulness"]],
        {m: _est(e) for m, e in d["carryover"].items()},
        _est(d["gain_carryover"]),
        {pc: [_est(e) for e in es] for pc, es in d["residual"].items()},
        [GroupDiff(g["group"], g["position"], int(g["heads"]), _est(g["z_difference"]),
                   {k: _est(e) for k, e in g["weight_delta"].items()},
                   {k: _est(e) for k, e in g["weight_rank"].items()}) for g in d["groups"]])


# ---------------------------------------------------------------------------------------------
# The summary, from the rows
# ---------------------------------------------------------------------------------------------

def _ratio_of_sums(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    d = np.sum(den, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, np.nan, np.sum(num, axis=axis) / np.where(d == 0, 1, d))


def carryover_statistic(paper_model, paper_circuit, *held_out, axis: int = -1):
    """Faithfulness pooled over the held-out wordings (circuit correct / model correct, summed over them) minus
    the paper wording's. ``held_out``: (model, circuit) flags of each held-out wording, flattened."""
    held_model = np.sum([np.sum(m, axis=axis) for m in held_out[0::2]], axis=0)
    held_circuit = np.sum([np.sum(c, axis=axis) for c in held_out[1::2]], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        held = np.where(held_model == 0, np.nan, held_circuit / np.where(held_model == 0, 1, held_model))
    return held - _ratio_of_sums(paper_circuit, paper_model, axis)


def gain_carryover_statistic(paper_base, paper_ft, *held_out, axis: int = -1):
    """The fine-tune's gain over the base, mean over the held-out wordings, minus its gain on the paper's.
    ``held_out``: (base, ft) flags of each held-out wording, flattened."""
    gains = [np.mean(f, axis=axis) - np.mean(b, axis=axis) for b, f in zip(held_out[0::2], held_out[1::2])]
    return np.mean(gains, axis=0) - (np.mean(paper_ft, axis=axis) - np.mean(paper_base, axis=axis))


def _float_flags(flags: Sequence[bool]) -> np.ndarray:
    return np.asarray(flags, dtype=float)


def _boot(data: list[np.ndarray], statistic, seed: int, label: str) -> Estimate:
    return to_estimate(paired_bootstrap(data, statistic, seed=seed, n_resamples=N_RESAMPLES, method="percentile",
                                        label=label))


def _mean_over(values: Sequence[float], seed: int) -> Estimate:
    if not values:
        return Estimate(None, None, None, 0, "bootstrap-percentile", 0.95, "no heads")
    return to_estimate(bootstrap_mean(values, seed=seed, n_resamples=N_RESAMPLES, method="percentile"))


def residual_estimates(per_layer: Sequence[Sequence[float]], seed: int) -> list[Estimate]:
    """Each layer's mean relative residual difference over prompts, with its percentile bootstrap CI
    (``metrics.diffing`` and this summary: one computation)."""
    return [to_estimate(bootstrap_mean(values, seed=seed, method="percentile")) for values in per_layer]


def group_diffs(diff: DiffItems, circuit: Mapping[str, Sequence[Sequence[int]]], seed: int) -> list[GroupDiff]:
    """Per head group of ``circuit`` (then the heads in no group, at each position class): mean relative weight
    change, rank and z difference over the group's heads. A k/v change is per KV head: a head reads its KV
    head's (``n_heads / n_kv_heads`` query heads per KV head)."""
    n_layers = len(diff.weight_delta["q"])
    n_heads = len(diff.weight_delta["q"][0]) if n_layers else 0
    n_kv = len(diff.weight_delta["k"][0]) if n_layers else 1
    per_kv = max(1, n_heads // max(1, n_kv))
    in_circuit = {(int(layer), int(head)) for hs in circuit.values() for layer, head in hs}
    everyone = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    sets = [(g, GROUP_POSITION[g], sorted({(int(a), int(b)) for a, b in circuit.get(g, [])})) for g in GROUPS]
    others = [h for h in everyone if h not in in_circuit]
    sets += [(OTHER, pc, others) for pc in POSITION_CLASSES]

    def site(kind: str, layer: int, head: int) -> tuple[int, int]:
        return (layer, head // per_kv) if kind in ("k", "v") else (layer, head)

    rows = []
    for group, position, heads in sets:
        z = [diff.heads[position][layer][head] for layer, head in heads]
        delta, rank = {}, {}
        for kind in WEIGHT_KINDS:
            sites = [site(kind, layer, head) for layer, head in heads]
            delta[kind] = _mean_over([diff.weight_delta[kind][a][b] for a, b in sites], seed)
            rank[kind] = _mean_over([float(diff.weight_rank[kind][a][b]) for a, b in sites], seed)
        rows.append(GroupDiff(group, position, len(heads), _mean_over(z, seed), delta, rank))
    return rows


def summarise(items: Sequence[WordingItems], diff: DiffItems, circuits: Mapping[str, Mapping[str, Any]],
              wordings: Sequence[str], seed: int) -> RobustnessSummary:
    """The summary of a file's rows: what ``check`` recomputes and compares."""
    wordings = list(wordings)
    if not wordings or wordings[0] != DEFAULT_WORDING or len(wordings) < 2:
        raise EtbenchError(f"robustness needs the paper's wording first and at least one held-out wording, "
                           f"got {wordings}")
    by = {(r.wording, r.model): r for r in items}
    for w in wordings:
        for m in MODELS:
            if (w, m) not in by:
                raise EtbenchError(f"no rows for {m} in the {w!r} wording")
    n = len(by[(wordings[0], "base")].model_correct)
    if n < 2 or any(len(r.model_correct) != n or len(r.circuit_correct) != n for r in items):
        raise EtbenchError(f"every wording and model needs the same n >= 2 items (the first has {n})")
    accuracy, gain, faith = [], [], []
    for w in wordings:
        for m in MODELS:
            flags = by[(w, m)].model_correct
            vs, p = None, None
            if w != wordings[0]:
                test = mcnemar(by[(wordings[0], m)].model_correct, flags, seed=seed, n_resamples=N_RESAMPLES)
                vs, p = to_estimate(test.difference), test.p_value
            accuracy.append(AccuracyRow(w, m, to_estimate(proportion_ci(sum(flags), n)), vs, p))
        test = mcnemar(by[(w, "base")].model_correct, by[(w, "ft")].model_correct, seed=seed,
                       n_resamples=N_RESAMPLES)
        gain.append(GainRow(w, to_estimate(test.difference), test.p_value))
        for m in MODELS:
            r = by[(w, m)]
            ratio = _boot([_float_flags(r.model_correct), _float_flags(r.circuit_correct)],
                          lambda mo, ci, axis=-1: _ratio_of_sums(ci, mo, axis), seed, "paired-bootstrap")
            if ratio.value is None:
                ratio = Estimate(None, None, None, n, ratio.method, ratio.level, "undefined: the model answers no item")
            faith.append(FaithfulnessRow(w, m, to_estimate(proportion_ci(sum(r.circuit_correct), n)), ratio))
    carry = {}
    for m in MODELS:
        data = [_float_flags(x) for w in wordings for x in (by[(w, m)].model_correct, by[(w, m)].circuit_correct)]
        carry[m] = _boot(data, carryover_statistic, seed, "paired-bootstrap")
    data = [_float_flags(by[(w, m)].model_correct) for w in wordings for m in MODELS]
    gain_carry = _boot(data, gain_carryover_statistic, seed, "paired-bootstrap")
    residual = {pc: residual_estimates(diff.residual[pc], seed) for pc in POSITION_CLASSES}
    return RobustnessSummary(accuracy, gain, faith, carry, gain_carry, residual,
                             group_diffs(diff, circuits["base"], seed))


# ---------------------------------------------------------------------------------------------
# Checks: a file is what its rows give, for the row it sits beside
# ---------------------------------------------------------------------------------------------

def _first_difference(a: Any, b: Any, where: str = "summary") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: fields {sorted(set(a) ^ set(b))} differ"
        for k in a:
            why = _first_difference(a[k], b[k], f"{where}.{k}")
            if why:
                return why
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} entries but the rows give {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            why = _first_difference(x, y, f"{where}.{i}")
            if why:
                return why
        return None
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None if a == b else f"{where} is {a!r} but the rows give {b!r}"
    return None if math.isclose(a, b, rel_tol=0, abs_tol=TOL) else f"{where} is {a!r} but the rows give {b!r}"


def card_circuits(card: sc.Scorecard) -> dict[str, dict[str, list[list[int]]]]:
    """The base and fine-tuned circuits' heads of a scorecard (``circuits`` named base and ft)."""
    out = {c.name: {g: [[int(x) for x in h] for h in hs] for g, hs in c.heads.items()} for c in card.circuits}
    missing = [m for m in MODELS if m not in out]
    if missing:
        raise EtbenchError(f"the scorecard has no {' or '.join(missing)} circuit to measure robustness with")
    return {m: out[m] for m in MODELS}


def paper_rows(items: Sequence[Mapping[str, Any]], model: str, n_boxes: int, n: int) -> WordingItems:
    """The paper wording's rows of ``model`` with its own circuit, from a scorecard's items: the first ``n`` of its
    accuracy rows at ``n_boxes`` and of its own circuit's faithfulness rows (the same seeded stream, item order;
    scoring ran them in the paper's wording). Raises when the card holds fewer than ``n``."""
    def first(measure: str, **match: Any) -> list[bool]:
        rows = sorted((r for r in items if r.get("measure") == measure
                       and all(r.get(k) == v for k, v in match.items())), key=lambda r: r["item"])
        if len(rows) < n:
            raise EtbenchError(f"the scorecard's items hold {len(rows)} {measure} rows of the {model} model, "
                               f"fewer than n = {n}")
        return [bool(r["correct"]) for r in rows[:n]]

    return WordingItems(DEFAULT_WORDING, model, first("accuracy", model=model, n_boxes=n_boxes),
                        first("circuit_accuracy", model=model, circuit=model))


def card_mean_n(card: sc.Scorecard) -> int:
    """The mean-ablation prompts behind a scorecard's faithfulness rows (its preset's ``mean_n``)."""
    preset = card.config.get("preset")
    if not isinstance(preset, dict) or not isinstance(preset.get("mean_n"), int):
        raise EtbenchError("the scorecard's config records no preset mean_n")
    return int(preset["mean_n"])


#: What a stored scorecard may gain after it was scored without changing what it measured: the file format's
#: version and sections added later (``submit --add-edges``: the edges section and its provenance record). A
#: robustness file computed before such an addition still belongs to the card.
LATER_ADDITIONS = ("schema_version", "edges")


def card_sha256(card: sc.Scorecard) -> str:
    """The hash a robustness file names its scorecard by: of the card's canonical JSON without
    ``LATER_ADDITIONS`` and ``provenance.added``."""
    content = {k: v for k, v in sc.to_dict(card).items() if k not in LATER_ADDITIONS}
    content["provenance"] = {k: v for k, v in content["provenance"].items() if k != "added"}
    return hashlib.sha256(dumps_json(content).encode()).hexdigest()


def check(rob: Robustness, card: sc.Scorecard, items: Sequence[Mapping[str, Any]], where: str = FILE_NAME) -> None:
    """Raise, naming the field, unless ``rob`` belongs to this scorecard (its hash, models, circuits and seed),
    its paper-wording rows are the card's own items, and its summary is what its rows give."""
    def fail(why: str) -> None:
        raise EtbenchError(f"{where} does not match its row: {why} (edited, or not this row's)")

    if rob.scorecard_sha256 != card_sha256(card):
        fail("it was computed from another scorecard (scorecard_sha256)")
    if (rob.base, rob.ft) != (card.base.ref, card.ft.ref):
        fail(f"models {rob.base} -> {rob.ft}, the scorecard's are {card.base.ref} -> {card.ft.ref}")
    if rob.seed != card.config.get("seed", 0):
        fail(f"seed {rob.seed}, the scorecard's is {card.config.get('seed', 0)}")
    if rob.circuits != card_circuits(card):
        fail("its circuits are not the scorecard's")
    if rob.wordings != list(WORDINGS):
        fail(f"wordings {rob.wordings}, expected {list(WORDINGS)}")
    if len(rob.items) != len(rob.wordings) * len(MODELS):
        fail(f"{len(rob.items)} row sets, expected one per wording and model")
    if any(len(r.model_correct) != rob.n for r in rob.items):
        fail(f"a row set does not hold n = {rob.n} items")
    if rob.paper_mean_n != card_mean_n(card):
        fail(f"paper_mean_n {rob.paper_mean_n}, the scorecard's is {card_mean_n(card)}")
    for m in MODELS:  # the paper wording's rows are the card's own items
        if rob.flags(DEFAULT_WORDING, m) != paper_rows(items, m, rob.n_boxes, rob.n):
            fail(f"the {m} model's paper-wording rows are not the scorecard's accuracy and faithfulness items")
    want = summarise(rob.items, rob.diff, rob.circuits, rob.wordings, rob.seed)
    why = _first_difference(jsonable(asdict(rob.summary)), jsonable(asdict(want)))
    if why:
        fail(why)


def load(path: str | Path) -> Robustness:
    path = Path(path)
    return Robustness.from_dict(read_json(path, "robustness file"), str(path))


def load_checked(card_path: str | Path, card: sc.Scorecard, items: Sequence[Mapping[str, Any]]) -> Optional[Robustness]:
    """The ``robustness.json`` beside the scorecard ``card_path`` (``card`` read from it, ``items`` its rows),
    checked against them; None when there is none."""
    card_path = Path(card_path)
    path = card_path.parent / FILE_NAME
    if not (path.is_file() or path.is_symlink()):
        return None
    rob = load(path)
    check(rob, card, items, str(path))
    return rob


def check_outputs(row_dir: str | Path) -> None:
    """Before any model loads: ``robustness.json`` in ``row_dir`` is not someone else's."""
    refuse_foreign_files(Path(row_dir), {FILE_NAME: None}, ROBUSTNESS_WRITER)


def write(rob: Robustness, row_dir: str | Path) -> Path:
    """``robustness.json``, atomically, claimed in the row directory's manifest (``core.io.claimed``)."""
    row_dir = Path(row_dir)
    with claimed(row_dir, [FILE_NAME], ROBUSTNESS_WRITER):
        return atomic_write_json(row_dir / FILE_NAME, rob.to_dict())


def canonical_bytes(rob: Robustness) -> bytes:
    return dumps_json(rob.to_dict()).encode("utf-8")


def stored_files(rob: Robustness) -> dict[str, bytes]:
    """``robustness.json`` and the manifest claiming it, as ``submit`` stores them in a store entry: the file there
    is etbench's, so ``etbench robustness`` of the row may replace it. (``submit`` replaces an entry as a whole;
    storing the file alone dropped the manifest ``etbench robustness`` had written there, and the row's next
    ``etbench robustness`` refused the file as someone else's.)"""
    return {FILE_NAME: canonical_bytes(rob), ROBUSTNESS_WRITER.manifest: manifest_bytes(ROBUSTNESS_WRITER, [FILE_NAME])}


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def robustness_tables(rob: Robustness) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the report's robustness and model-diffing sections."""
    s = rob.summary
    acc_rows = []
    for w in rob.wordings:
        row = [w]
        for m in MODELS:
            a = s.pick_accuracy(w, m)
            text = format_estimate_of(a.accuracy)
            if a.vs_paper is not None:
                text += f" (vs paper {format_estimate_of(a.vs_paper, signed=True)}, p {format_p(a.vs_paper_p)})"
            row.append(text)
        g = next(x for x in s.gain if x.wording == w)
        row.append(f"{format_estimate_of(g.gain, signed=True)} (McNemar p {format_p(g.mcnemar_p)})")
        for m in MODELS:
            f = s.pick_faithfulness(w, m)
            row.append(f"{format_estimate_of(f.faithfulness)} (circuit {format_estimate_of(f.circuit_accuracy)})")
        acc_rows.append(row)
    held = " + ".join(rob.wordings[1:])
    acc_rows.append([f"robustness ({held} vs paper)", "", "",
                     f"gain carry-over {format_estimate_of(s.gain_carryover, signed=True)}",
                     f"carry-over {format_estimate_of(s.carryover['base'], signed=True)}",
                     f"carry-over {format_estimate_of(s.carryover['ft'], signed=True)}"])
    acc_header = ["wording", f"base accuracy (n {rob.n})", f"fine-tuned accuracy (n {rob.n})",
                  "fine-tuned − base (paired)", "base circuit faithfulness on base",
                  "fine-tuned circuit faithfulness on fine-tuned"]
    res_rows = []
    n_layers = len(s.residual[POSITION_CLASSES[0]])
    for layer in range(n_layers):
        res_rows.append([str(layer)] + [format_estimate_of(s.residual[pc][layer]) for pc in POSITION_CLASSES])
    res_header = ["layer"] + [f"{pc} (n {rob.diff.n})" for pc in POSITION_CLASSES]
    grp_rows = []
    for g in s.groups:
        name = f"{GROUP_CODES[g.group]} {g.group}" if g.group in GROUP_CODES else f"no group ({g.position})"
        grp_rows.append([name, str(g.heads), format_estimate_of(g.z_difference)]
                        + [f"{format_estimate_of(g.weight_delta[k])}; rank {format_estimate_of(g.weight_rank[k])}"
                           for k in WEIGHT_KINDS])
    grp_header = ["base circuit group", "heads", "z difference at its position"] + [
        f"ΔW_{k} relative norm; rank" for k in WEIGHT_KINDS]
    return [("Template robustness (held-out wordings)", acc_header, acc_rows),
            ("Model diffing: relative residual difference ‖h_ft − h_base‖/‖h_base‖ per layer", res_header, res_rows),
            ("Model diffing by base circuit group (means over the group's heads, CI over heads)", grp_header, grp_rows)]
