"""Edge scores and their comparison between two models, without a model (docs/method.md §13).

``metrics.edges`` runs path patching for every edge (torch); this module holds what the scorecard, ``submit`` and
the leaderboard need from its results without torch: the edge types, the stored per-prompt effects
(``EdgeScores``), the node set rule, the comparison (``compare_edges``: overlap, rewiring, chance level, the
base edges' share, bootstrap CIs) and the scorecard's ``edge_effect`` rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import hypergeom

from etbench.core.errors import EtbenchError
from etbench.core.io import jsonable
from etbench.core.stats import Estimate, format_estimate_of, format_p
from etbench.metrics.overlap import Overlap, chance_overlap
from etbench.schema import scorecard as sc
from etbench.schema.circuit import GROUPS, Circuit, Head, group_name
from etbench.schema.scorecard import OverlapChance

SCHEMA_VERSION = 1
FORMAT = "etbench-edges"
COMPARISON_FORMAT = "etbench-edge-comparison"
ALL = "all"
DEFAULT_TOP_FRACTION = 0.25
RESAMPLES = 2000
CI_METHOD = "bootstrap over edge prompts"
#: The scorecard's edge scores: 7-box prompts in batches of 8 (a run recomputes from the batch's earliest sender
#: position, so small batches of items sorted by that position cost least).
EDGE_BOXES = 7
EDGE_BATCH_SIZE = 8
#: The per-prompt rows of the scorecard's edges section (items file).
EDGE_MEASURE = "edge_effect"


@dataclass(frozen=True)
class EdgeType:
    name: str
    sender: str  # group
    receiver: str | None  # group; None = the logits
    site: str  # what step 2 patches: "q", "v", or "logits" (no step 2)


#: The paper's flow, upstream first: what path patching of each sender group patches (``discovery.EDGE_RECEIVERS``,
#: written out here so that this module needs no torch; tests/unit/test_edges.py checks they agree).
EDGE_TYPES: tuple[EdgeType, ...] = (
    EdgeType("D->C", "structure_reader", "position_detector", "v"),
    EdgeType("C->B", "position_detector", "position_transmitter", "v"),
    EdgeType("B->A", "position_transmitter", "value_fetcher", "q"),
    EdgeType("A->logits", "value_fetcher", None, "logits"),
)
EDGE_TYPE_BY_NAME = {t.name: t for t in EDGE_TYPES}


@dataclass
class Edge:
    """One edge and its per-prompt path-patching effects (NaN where p_clean underflowed to 0)."""

    type: str
    sender: Head
    receiver: Head | None  # (layer, head) for q receivers, (layer, KV head) for v; None for the logits
    effects: list[float]

    @property
    def key(self) -> tuple:
        return (self.type, self.sender, self.receiver)

    @property
    def score(self) -> float:
        finite = [x for x in self.effects if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else float("nan")


@dataclass
class EdgeScores:
    """Every reachable edge between ``nodes`` on one model, scored on ``n_items`` prompts."""

    model: str
    nodes: dict[str, list[Head]]
    edges: list[Edge]
    n_items: int
    parameters: dict[str, Any] = field(default_factory=dict)
    forward_passes: dict[str, int] = field(default_factory=dict)

    def of_type(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.type == name]

    def to_dict(self) -> dict[str, Any]:
        return jsonable({
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "model": self.model,
            "nodes": {g: [list(h) for h in hs] for g, hs in self.nodes.items()}, "n_items": self.n_items,
            "parameters": self.parameters, "forward_passes": self.forward_passes,
            # a non-finite effect is stored as None: JSON has no NaN
            "edges": [{"type": e.type, "sender": list(e.sender), "receiver": None if e.receiver is None
                       else list(e.receiver), "effects": [x if math.isfinite(x) else None for x in e.effects]}
                      for e in self.edges]})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EdgeScores:
        if data.get("format") != FORMAT or data.get("schema_version") != SCHEMA_VERSION:
            raise EtbenchError(f"not an {FORMAT} file of schema version {SCHEMA_VERSION}")
        try:
            edges = [Edge(e["type"], head_of(e["sender"]), None if e["receiver"] is None else head_of(e["receiver"]),
                          [float("nan") if x is None else float(x) for x in e["effects"]]) for e in data["edges"]]
            out = cls(str(data["model"]), {group_name(g): [head_of(h) for h in hs] for g, hs in data["nodes"].items()},
                      edges, int(data["n_items"]), dict(data.get("parameters", {})),
                      dict(data.get("forward_passes", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise EtbenchError(f"malformed {FORMAT} file: {err}") from None
        bad = [e for e in edges if e.type not in EDGE_TYPE_BY_NAME or len(e.effects) != out.n_items]
        if bad:
            raise EtbenchError(f"malformed {FORMAT} file: edge {bad[0].key} has an unknown type or "
                               f"{len(bad[0].effects)} effects for {out.n_items} items")
        return out


def head_of(x: Sequence[int]) -> Head:
    """A [layer, head] pair of integers as a ``Head`` (ValueError otherwise)."""
    if len(x) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise ValueError(f"a head must be [layer, head] integers, got {x!r}")
    return (int(x[0]), int(x[1]))


def nodes_of(base: Circuit, ft: Circuit, k: Mapping[str, int]) -> dict[str, list[Head]]:
    """Per group, the union of both circuits' top ``k[g]`` heads (the base's first, in importance order): the
    node set the edges are scored on (``edges.edge_nodes`` with the default k; ``rederive`` with a card's)."""
    if None in (base.n_layers, base.n_heads, ft.n_layers, ft.n_heads):
        raise EtbenchError("edge nodes need circuits that record their model's shape (n_layers, n_heads)")
    if (base.n_layers, base.n_heads) != (ft.n_layers, ft.n_heads):
        raise EtbenchError(f"edge nodes need two circuits of one head layout: {base.n_layers} x {base.n_heads} "
                           f"vs {ft.n_layers} x {ft.n_heads} (layers x heads)")
    ks = {group_name(g): int(v) for g, v in k.items()}
    if any(v < 1 for v in ks.values()):
        raise EtbenchError(f"edge node k must be at least 1 per group, got {ks}")
    return {g: list(dict.fromkeys([*base.heads(g)[: ks.get(g, 0)], *ft.heads(g)[: ks.get(g, 0)]])) for g in GROUPS}


def reachable_edges(nodes: Mapping[str, Sequence[Head]], types: Sequence[str], kv_group_size: int) -> list[tuple]:
    """The edge keys ``(type, sender, receiver)`` path patching scores between ``nodes``, in ``edge_scores``'
    order: per type (upstream first), per sender, each receiver site above the sender's layer (a v receiver is
    a (layer, KV head) site: ``kv_group_size`` query heads share it), in order of site, or
    None for the logits. A receiver at or below the sender cannot be reached: no edge."""
    out = []
    for t in EDGE_TYPES:
        if t.name not in types:
            continue
        sites: dict[int, list[int]] = {}
        for layer, head in nodes.get(t.receiver, []) if t.receiver is not None else []:
            h = head // kv_group_size if t.site == "v" else head
            if h not in sites.setdefault(layer, []):
                sites[layer].append(h)
        for sender in sorted(tuple(s) for s in nodes.get(t.sender, [])):
            if t.receiver is None:
                out.append((t.name, sender, None))
            else:
                out += [(t.name, sender, site) for site in sorted((m, h) for m in sites if m > sender[0]
                                                                  for h in sites[m])]
    return out


def check_edge_options(*, n: int = 2, types: Sequence[str] | None = None,
                       top_fraction: float = DEFAULT_TOP_FRACTION) -> list[str]:
    """Refuse bad edge options before any model loads; returns the edge types (default all)."""
    if n < 2:
        raise EtbenchError(f"edge scores need at least 2 prompts (a CI resamples them), got {n}")
    if not 0 < top_fraction <= 1:  # also refuses NaN
        raise EtbenchError(f"top fraction must be in (0, 1], got {top_fraction}")
    names = [t.name for t in EDGE_TYPES] if not types else list(dict.fromkeys(types))
    unknown = [t for t in names if t not in EDGE_TYPE_BY_NAME]
    if unknown:
        raise EtbenchError(f"unknown edge type(s) {', '.join(unknown)}; known: {', '.join(EDGE_TYPE_BY_NAME)}")
    return names


@dataclass
class EdgeOverlap:
    """One edge type (or ``all``): the base's top edges recovered among the fine-tuned model's."""

    type: str
    n_candidates: int  # M: reachable edges of this type between the nodes
    k: int  # top edges per model
    n_common: int
    overlap: Estimate
    rewiring: Estimate  # 1 - overlap
    chance: OverlapChance | None
    base_edges_share: Estimate


@dataclass
class EdgeComparison:
    base: str
    ft: str
    rows: list[EdgeOverlap]
    parameters: dict[str, Any]

    def row(self, name: str) -> EdgeOverlap:
        for r in self.rows:
            if r.type == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"format": COMPARISON_FORMAT, "schema_version": SCHEMA_VERSION, "base": self.base,
                         "ft": self.ft, "parameters": self.parameters, "rows": [asdict(r) for r in self.rows]})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EdgeComparison:
        if data.get("format") != COMPARISON_FORMAT or data.get("schema_version") != SCHEMA_VERSION:
            raise EtbenchError(f"not an {COMPARISON_FORMAT} file of schema version {SCHEMA_VERSION}")
        try:
            rows = [EdgeOverlap(r["type"], int(r["n_candidates"]), int(r["k"]), int(r["n_common"]),
                                Estimate(**r["overlap"]), Estimate(**r["rewiring"]),
                                None if r["chance"] is None else OverlapChance(**r["chance"]),
                                Estimate(**r["base_edges_share"])) for r in data["rows"]]
            return cls(str(data["base"]), str(data["ft"]), rows, dict(data["parameters"]))
        except (KeyError, TypeError) as err:
            raise EtbenchError(f"malformed {COMPARISON_FORMAT} file: {err}") from None


def _check_comparable(base: EdgeScores, ft: EdgeScores) -> None:
    keys = ("n_boxes", "n", "seed")
    if {k: base.parameters.get(k) for k in keys} != {k: ft.parameters.get(k) for k in keys}:
        raise EtbenchError("edge scores of the two models were computed on different prompts "
                           f"({ {k: base.parameters.get(k) for k in keys} } vs { {k: ft.parameters.get(k) for k in keys} })")
    if base.n_items != ft.n_items or [e.key for e in base.edges] != [e.key for e in ft.edges]:
        raise EtbenchError("edge scores of the two models cover different edges or items: score both on one node "
                           "set (edge_nodes) and the same prompts")


def _top_mask(means: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``means`` ``[R, M]``, a mask of its k entries of largest |value|; NaN last, ties by column
    (the edges' canonical order)."""
    mag = np.where(np.isfinite(means), np.abs(means), -np.inf)
    order = np.argsort(-mag, axis=1, kind="stable")[:, :k]
    mask = np.zeros(means.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def _resampled_means(effects: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[R, M]`` mean effect of each edge on each resample (``counts[r, i]``: draws of item i), NaN left out."""
    finite = np.isfinite(effects)
    sums = counts @ np.where(finite, effects, 0.0).T
    n = counts @ finite.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, sums / np.maximum(n, 1), np.nan)


def _estimate(value: float | None, samples: np.ndarray, n: int, n_items: int, what: str) -> Estimate:
    if value is None:
        return Estimate(None, None, None, n, CI_METHOD, note=f"undefined: {what}")
    kept = samples[np.isfinite(samples)]
    if len(kept) == 0:
        return Estimate(value, None, None, n, CI_METHOD, note=f"no CI: undefined in every resample ({what})")
    low, high = (float(x) for x in np.quantile(kept, [0.025, 0.975]))
    if low == high:  # every resample agrees: a width-zero interval would read as certainty
        return Estimate(value, None, None, n, CI_METHOD,
                        note=f"no CI: the same value in all {len(kept)} resamples of {n_items} prompts")
    dropped = len(samples) - len(kept)
    note = f"percentile CI over {len(samples)} resamples of {n_items} prompts; node set and k held fixed"
    if dropped:
        note += f"; {dropped} resamples undefined ({what}) and left out"
    return Estimate(value, low, high, n, CI_METHOD, note=note)


def _sum_chance(parts: Sequence[tuple[int, int]], n_common: int) -> OverlapChance | None:
    """Chance level of the pooled overlap: a sum of independent hypergeometric counts, one per edge type
    ``(M, k)``; its pmf is their convolution."""
    pmf = np.ones(1)
    for m, k in parts:
        pmf = np.convolve(pmf, hypergeom(m, k, k).pmf(np.arange(k + 1)))
    total_k = sum(k for _, k in parts)
    if not total_k:
        return None
    c = np.arange(len(pmf))
    jaccard = float(np.sum(pmf * c / np.maximum(2 * total_k - c, 1)))
    return OverlapChance(pool=sum(m for m, _ in parts), base_in_ft=float(np.sum(pmf * c)) / total_k,
                         jaccard=jaccard, p_value=float(min(1.0, pmf[n_common:].sum())),
                         method="sum of hypergeometrics over edge types")


def compare_edges(base: EdgeScores, ft: EdgeScores, *, top_fraction: float = DEFAULT_TOP_FRACTION, seed: int = 0,
                  n_resamples: int = RESAMPLES) -> EdgeComparison:
    """Edge overlap, rewiring and the base edges' share per edge type and over all types (module docstring)."""
    check_edge_options(top_fraction=top_fraction)
    if n_resamples < 1:
        raise EtbenchError(f"resamples must be at least 1, got {n_resamples}")
    _check_comparable(base, ft)
    n_items = base.n_items
    draws = np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))
    counts = np.zeros((n_resamples, n_items))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    whole = np.ones((1, n_items))
    rows: list[EdgeOverlap] = []
    pooled = {"common": 0, "k": 0, "common_r": np.zeros(n_resamples), "k_r": 0, "kept": 0.0, "best": 0.0,
              "kept_r": np.zeros(n_resamples), "best_r": np.zeros(n_resamples), "parts": []}
    for t in EDGE_TYPES:
        eb = np.asarray([e.effects for e in base.of_type(t.name)], dtype=float)
        ef = np.asarray([e.effects for e in ft.of_type(t.name)], dtype=float)
        m = len(eb)
        if m == 0:
            continue
        k = max(1, math.ceil(top_fraction * m))
        stats = []
        for cnt in (whole, counts):
            mb, mf = _resampled_means(eb, cnt), _resampled_means(ef, cnt)
            tb, tf = _top_mask(mb, k), _top_mask(mf, k)
            common = (tb & tf).sum(axis=1)
            mag_f = np.where(np.isfinite(mf), np.abs(mf), 0.0)
            kept, best = (mag_f * tb).sum(axis=1), (mag_f * tf).sum(axis=1)
            stats.append((common, kept, best))
        (c0, kept0, best0), (cr, kept_r, best_r) = stats
        common = int(c0[0])
        share = float(kept0[0] / best0[0]) if best0[0] > 0 else None
        with np.errstate(invalid="ignore", divide="ignore"):
            share_r = np.where(best_r > 0, kept_r / np.where(best_r > 0, best_r, 1), np.nan)
        rows.append(_row(t.name, m, k, common, cr / k, share, share_r, n_items,
                         chance_overlap(Overlap(k, k, common, 2 * k - common), m)))
        pooled["common"] += common
        pooled["k"] += k
        pooled["common_r"] += cr
        pooled["kept"] += float(kept0[0])
        pooled["best"] += float(best0[0])
        pooled["kept_r"] += kept_r
        pooled["best_r"] += best_r
        pooled["parts"].append((m, k))
    if rows:
        # effects of different types are on one scale (relative change of p(answer)), so shares pool
        best, best_r = pooled["best"], pooled["best_r"]
        with np.errstate(invalid="ignore", divide="ignore"):
            share_r = np.where(best_r > 0, pooled["kept_r"] / np.where(best_r > 0, best_r, 1), np.nan)
        rows.append(_row(ALL, sum(m for m, _ in pooled["parts"]), pooled["k"], pooled["common"],
                         pooled["common_r"] / pooled["k"], pooled["kept"] / best if best > 0 else None, share_r,
                         n_items, _sum_chance(pooled["parts"], pooled["common"])))
    params = {"top_fraction": top_fraction, "seed": seed, "n_resamples": n_resamples, "n_items": n_items,
              "nodes": {g: len(hs) for g, hs in base.nodes.items()}, "order": "largest |effect| first"}
    return EdgeComparison(base.model, ft.model, rows, params)


def _row(name: str, m: int, k: int, common: int, overlap_r: np.ndarray, share: float | None, share_r: np.ndarray,
         n_items: int, chance: OverlapChance | None) -> EdgeOverlap:
    overlap = _estimate(common / k, overlap_r, k, n_items, "no edges")
    low, high = overlap.low, overlap.high
    rewiring = Estimate(1 - common / k, None if high is None else 1 - high, None if low is None else 1 - low, k,
                        CI_METHOD, note=overlap.note)
    return EdgeOverlap(name, m, k, common, overlap, rewiring, chance,
                       _estimate(share, share_r, k, n_items, "the fine-tuned model's top edges carry no effect"))


def format_edge_comparison(cmp: EdgeComparison) -> str:
    """Table: per edge type, top edges k of M, overlap and chance, rewiring, the base edges' share."""
    from tabulate import tabulate

    def fmt(e: Estimate) -> str:
        return format_estimate_of(e, undefined="undefined", show_note=False)

    rows = [[r.type, f"{r.k} of {r.n_candidates}", fmt(r.overlap),
             "—" if r.chance is None else f"{r.chance.base_in_ft:.3f} (p {format_p(r.chance.p_value)})",
             fmt(r.rewiring), fmt(r.base_edges_share)] for r in cmp.rows]
    head = f"edges: {cmp.base} -> {cmp.ft} ({cmp.parameters['n_items']} prompts, top {cmp.parameters['top_fraction']})"
    return head + "\n" + tabulate(rows, headers=["edges", "top k of M", "overlap", "by chance", "rewiring",
                                                 "base edges' share"], tablefmt="github", disable_numparse=True)




# ---------------------------------------------------------------------------------------------- the scorecard


def edge_rows(scores: EdgeScores, model: str) -> list[dict[str, Any]]:
    """The scorecard's per-prompt rows of one model's edge scores (items file): one per edge and prompt,
    ``score`` null where the effect was not finite."""
    return [{"measure": EDGE_MEASURE, "model": model, "edge": e.type, "layer": e.sender[0], "head": e.sender[1],
             "receiver": None if e.receiver is None else list(e.receiver), "item": i,
             "score": x if math.isfinite(x) else None}
            for e in scores.edges for i, x in enumerate(e.effects)]


def scores_from_rows(rows: Sequence[Mapping[str, Any]], model: str, nodes: Mapping[str, Sequence[Sequence[int]]],
                     n: int, parameters: Mapping[str, Any]) -> EdgeScores:
    """One model's ``EdgeScores`` from its ``edge_effect`` rows (``edge_rows``' inverse): every edge must have
    exactly the prompts 0..n-1."""
    by_edge: dict[tuple, dict[int, Any]] = {}
    for r in rows:
        if r.get("measure") != EDGE_MEASURE or r.get("model") != model:
            continue
        try:
            receiver = None if r.get("receiver") is None else head_of(r["receiver"])
            key = (r["edge"], head_of([r["layer"], r["head"]]), receiver)
        except (KeyError, TypeError, ValueError) as err:
            raise EtbenchError(f"malformed edge_effect row of {model}: {err}") from None
        by_edge.setdefault(key, {})[r["item"]] = r.get("score")
    edges = []
    for (kind, sender, receiver), by_item in by_edge.items():
        if sorted(by_item) != list(range(n)):
            raise EtbenchError(f"edge_effect rows of {model} {kind} L{sender[0]}H{sender[1]} -> {receiver} are not "
                               f"prompts 0..{n - 1}")
        edges.append(Edge(kind, sender, receiver, [math.nan if by_item[i] is None else float(by_item[i])
                                                   for i in range(n)]))
    order = {t.name: i for i, t in enumerate(EDGE_TYPES)}
    edges.sort(key=lambda e: (order.get(e.type, len(order)), e.sender, e.receiver or (-1, -1)))
    return EdgeScores(model, {group_name(g): [head_of(h) for h in hs] for g, hs in nodes.items()}, edges, n,
                      dict(parameters))


def section_of(base: EdgeScores, ft: EdgeScores, node_k: Mapping[str, int], seed: int) -> sc.EdgesScore:
    """The scorecard's ``edges`` section: the comparison of both models' scores with the settings it was made
    under (what ``submit`` re-derives: the same function on the rows)."""
    cmp = compare_edges(base, ft, seed=seed)
    p = base.parameters
    return sc.EdgesScore(types=list(p["types"]), n=base.n_items, seed=int(p["seed"]), n_boxes=int(p["n_boxes"]),
                         batch_size=int(p["batch_size"]), top_fraction=cmp.parameters["top_fraction"],
                         n_resamples=cmp.parameters["n_resamples"], node_k=dict(node_k),
                         nodes={g: [list(h) for h in hs] for g, hs in base.nodes.items()},
                         kv_group_size=int(p["kv_group_size"]),
                         rows=[sc.EdgeTypeScore(r.type, r.n_candidates, r.k, r.n_common, r.overlap, r.rewiring,
                                                 r.chance, r.base_edges_share) for r in cmp.rows])


def section_parameters(section: sc.EdgesScore) -> dict[str, Any]:
    """The ``EdgeScores.parameters`` a section's rows were scored under (what ``compare_edges`` checks)."""
    return {"n_boxes": section.n_boxes, "n": section.n, "seed": section.seed, "batch_size": section.batch_size,
            "types": list(section.types), "kv_group_size": section.kv_group_size}
