"""Edges between the circuit's head groups, and how far fine-tuning rewires them (docs/method.md §13).

Head overlap compares *nodes*; a fine-tune can keep the nodes and still route information between them
differently (Wang et al., ICML 2025). The paper's flow is D -> C -> B -> A -> logits (docs/method.md §3),
and its path patching already measures one hop of it per sender: step 2 patches the receivers' input
(B -> A: the value fetchers' query at the last token; C -> B and D -> C: the receivers' value at the
sender's position). With a single receiver, that is the effect of one **edge**:

    effect(s -> r) = mean_i (p_i - p_clean_i) / p_clean_i,   step 2 replacing only r's input

(``discovery.path_patching_edge_effects``). A value fetcher's edge goes to the logits: its node score.
Under grouped-query attention a value vector feeds every query head of its KV group, so a v receiver is
a (layer, KV head) *site*; a q receiver is a (layer, head).

Both models are scored on **one node set** (``edge_nodes``: each group's top heads of both circuits) and
the same prompts, so every edge has a score in each model. Per edge type, each model's **top edges**
are its ``k = ceil(top_fraction x M)`` edges of largest |effect| (M: the type's reachable edges; either
sign, as circuit growth orders heads). Then:

* ``overlap`` = |top_base ∩ top_ft| / k, ``rewiring`` = 1 - overlap; chance: the ft's top-k replaced by
  a random k-subset of the M edges (hypergeometric; the ``all`` row sums the types);
* ``base_edges_share``: on the fine-tuned model, the |effect| its base's top edges carry over the
  |effect| its own top edges carry (1 when the base's edges are the ft's strongest; a share of path
  effects, not an ablation faithfulness).

CIs are percentile bootstraps over the prompts (one draw for both models: the same items), 2,000
resamples; the node set, the noise pairs and k are held fixed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import hypergeom

from etbench.core.errors import EtbenchError
from etbench.core.io import Writer, atomic_write_json, claimed, jsonable, refuse_foreign_files
from etbench.core.stats import Estimate, format_estimate_of, format_p
from etbench.mech.forward import PassCounter
from etbench.mech.heads import head_map
from etbench.metrics.discovery import (
    EDGE_RECEIVERS,
    PAPER_CANDIDATE_K,
    default_k,
    discovery_pairs,
    path_patching_edge_effects,
)
from etbench.metrics.overlap import Overlap, chance_overlap
from etbench.models.load import as_loaded
from etbench.schema.circuit import GROUP_CODES, GROUPS, Circuit, Head, group_name
from etbench.schema.scorecard import OverlapChance
from etbench.task.layout import pad_id_of

SCHEMA_VERSION = 1
FORMAT = "etbench-edges"
COMPARISON_FORMAT = "etbench-edge-comparison"
ALL = "all"
DEFAULT_TOP_FRACTION = 0.25
RESAMPLES = 2000
CI_METHOD = "bootstrap over edge prompts"


@dataclass(frozen=True)
class EdgeType:
    name: str
    sender: str  # group
    receiver: str | None  # group; None = the logits
    site: str  # what step 2 patches: "q", "v", or "logits" (no step 2)


#: The paper's flow, upstream first.
EDGE_TYPES: tuple[EdgeType, ...] = tuple(
    EdgeType(f"{GROUP_CODES[g]}->{GROUP_CODES[r[0]] if r else 'logits'}", g, r[0] if r else None,
             r[1] if r else "logits")
    for g, r in reversed(EDGE_RECEIVERS.items()))
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
            edges = [Edge(e["type"], _head(e["sender"]), None if e["receiver"] is None else _head(e["receiver"]),
                          [float("nan") if x is None else float(x) for x in e["effects"]]) for e in data["edges"]]
            out = cls(str(data["model"]), {group_name(g): [_head(h) for h in hs] for g, hs in data["nodes"].items()},
                      edges, int(data["n_items"]), dict(data.get("parameters", {})),
                      dict(data.get("forward_passes", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise EtbenchError(f"malformed {FORMAT} file: {err}") from None
        bad = [e for e in edges if e.type not in EDGE_TYPE_BY_NAME or len(e.effects) != out.n_items]
        if bad:
            raise EtbenchError(f"malformed {FORMAT} file: edge {bad[0].key} has an unknown type or "
                               f"{len(bad[0].effects)} effects for {out.n_items} items")
        return out


def _head(x: Sequence[int]) -> Head:
    if len(x) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise ValueError(f"a head must be [layer, head] integers, got {x!r}")
    return (int(x[0]), int(x[1]))


def edge_nodes(base: Circuit, ft: Circuit, k: Mapping[str, int] | int | None = None) -> dict[str, list[Head]]:
    """Per group, the union of both circuits' top ``k[g]`` heads (the base's first, in importance order).

    ``k`` defaults to the paper's candidate k scaled to the model (``discovery.default_k``: 15, 3, 7 and 2
    heads of SmolLM2-135M's 270). Sized circuits can hold most of a model's heads; edges among all of
    them would cost |A| x |B| patched runs per prompt batch, and the top heads carry the groups' roles."""
    if None in (base.n_layers, base.n_heads, ft.n_layers, ft.n_heads):
        raise EtbenchError("edge nodes need circuits that record their model's shape (n_layers, n_heads)")
    if (base.n_layers, base.n_heads) != (ft.n_layers, ft.n_heads):
        raise EtbenchError(f"edge nodes need two circuits of one head layout: {base.n_layers} x {base.n_heads} "
                           f"vs {ft.n_layers} x {ft.n_heads} (layers x heads)")
    if k is None:
        ks = default_k(base.n_layers * base.n_heads, PAPER_CANDIDATE_K)
    elif isinstance(k, int):
        ks = {g: k for g in GROUPS}
    else:
        ks = {group_name(g): int(v) for g, v in k.items()}
    if any(v < 1 for v in ks.values()):
        raise EtbenchError(f"edge node k must be at least 1 per group, got {ks}")
    out = {}
    for g in GROUPS:
        heads = list(dict.fromkeys([*base.heads(g)[: ks.get(g, 0)], *ft.heads(g)[: ks.get(g, 0)]]))
        out[g] = heads
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


def edge_scores(model, nodes: Mapping[str, Sequence[Sequence[int]]], tokenizer=None, *, n_boxes: int = 7,
                n: int = 32, seed: int = 0, batch_size: int = 8, types: Sequence[str] | None = None,
                prefix_cache: bool = True, model_name: str = "", progress: bool = False) -> EdgeScores:
    """Score every reachable edge between ``nodes`` (``{group: heads}``) on ``model`` (a loaded model +
    ``tokenizer``, a ``LoadedModel`` or a registry ref), on the first ``n`` items of seed ``seed`` and their
    noise pairs (the discovery prompts of that seed). ``types``: the edge types to score (default all).

    Cost: one sender run per sender and one receiver run per edge, per batch. A run recomputes the tokens
    from the batch's earliest sender position on, so items are batched in order of that position (D's
    previous query label ranges over the whole context; C and B sit near the end)."""
    types = check_edge_options(n=n, types=types)
    model, tokenizer, model_name = as_loaded(model, tokenizer, model_name)
    hm = head_map(model)
    spec = hm.spec
    node_heads = {group_name(g): [_head(tuple(int(v) for v in h)) for h in hs] for g, hs in nodes.items()}
    for g, hs in node_heads.items():
        for layer, head in hs:
            if not (0 <= layer < spec.n_layers and 0 <= head < spec.n_heads):
                raise EtbenchError(f"{g} node L{layer}H{head} is not a head of this model "
                                   f"({spec.n_layers} layers x {spec.n_heads} heads)")
    _, _, _, encoded = discovery_pairs(tokenizer, n_boxes, n, seed)
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].base_layout.position("prev_query_label"))
    chosen = [EDGE_TYPE_BY_NAME[t] for t in types]
    senders = {t.sender: node_heads.get(t.sender, []) for t in chosen}
    receivers = {t.sender: node_heads.get(t.receiver, []) for t in chosen if t.receiver is not None}
    counter = PassCounter()
    effects = path_patching_edge_effects(model, hm, [encoded[i] for i in order], senders, receivers, batch_size,
                                         pad_id_of(tokenizer), counter, prefix_cache, progress)
    edges = []
    for t in EDGE_TYPES:
        if t not in chosen:
            continue
        for (sender, site), sorted_items in sorted(effects.get(t.sender, {}).items(),
                                                   key=lambda kv: (kv[0][0], kv[0][1] or (-1, -1))):
            per_item = [0.0] * len(order)
            for j, i in enumerate(order):  # back to the items' own order
                per_item[i] = sorted_items[j]
            edges.append(Edge(t.name, sender, site, per_item))
    params = {"n_boxes": n_boxes, "n": n, "seed": seed, "batch_size": batch_size, "types": types,
              "score": "mean relative change of p(answer), path-patched through one receiver",
              "v_receivers": "KV-head sites" if spec.n_kv_heads != spec.n_heads else "heads"}
    return EdgeScores(model_name, node_heads, edges, len(encoded), params, counter.as_dict())


# ---------------------------------------------------------------------------------------------- comparison


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


# ---------------------------------------------------------------------------------------------- files


#: ``etbench edges``' files in its output directory, and its manifest there (the ownership rule of core.io).
EDGES_WRITER = Writer("etbench edges", ".etbench-edges-manifest.json")
EDGE_OUTPUTS = ("edges_base.json", "edges_ft.json", "edge_comparison.json")


def check_edge_outputs(out_dir: str | Path) -> None:
    """Refuse, before any model loads, an output directory holding a file of an output's name that
    ``etbench edges`` did not write."""
    refuse_foreign_files(Path(out_dir), dict.fromkeys(EDGE_OUTPUTS), EDGES_WRITER)


def write_edges(out_dir: str | Path, base: EdgeScores, ft: EdgeScores, cmp: EdgeComparison) -> list[Path]:
    """The three files, each written atomically, claimed in the manifest as ``accuracy.write_run`` claims its
    own (core.io.claimed: a failed write puts the manifest back)."""
    out_dir = Path(out_dir)
    with claimed(out_dir, EDGE_OUTPUTS, EDGES_WRITER):
        return [atomic_write_json(out_dir / name, obj.to_dict()) for name, obj in zip(EDGE_OUTPUTS, (base, ft, cmp))]


def compare_models(base, ft, circuit_base: Circuit, circuit_ft: Circuit, *, k: Mapping[str, int] | int | None = None,
                   n_boxes: int = 7, n: int = 32, seed: int = 0, batch_size: int = 8,
                   types: Sequence[str] | None = None, top_fraction: float = DEFAULT_TOP_FRACTION,
                   progress: bool = False) -> tuple[EdgeScores, EdgeScores, EdgeComparison]:
    """Both models' edge scores on the node set of the two circuits (``edge_nodes``), and their comparison.
    ``base``/``ft``: ``LoadedModel``s or registry refs."""
    types = check_edge_options(n=n, types=types, top_fraction=top_fraction)
    nodes = edge_nodes(circuit_base, circuit_ft, k)
    kw = dict(n_boxes=n_boxes, n=n, seed=seed, batch_size=batch_size, types=types, progress=progress)
    scores_base = edge_scores(base, nodes, **kw)
    scores_ft = edge_scores(ft, nodes, **kw)
    return scores_base, scores_ft, compare_edges(scores_base, scores_ft, top_fraction=top_fraction, seed=seed)
