"""Head overlap between the base model's and the fine-tuned model's heads (docs/method.md §5, §7).

For one group (or ``"all"``), with B the base's heads and F the fine-tuned's:

* ``base_in_ft = |B ∩ F| / |B|``: the fraction of the base's heads found again in the fine-tuned set
  (the paper's "27/40 of Llama's Value Fetcher heads are in Goat's"); undefined when B is empty.
* ``jaccard = |B ∩ F| / |B ∪ F|``; undefined when both are empty.
* the **overlap at equal size** (``equal_size_overlap``, rows ``heads="circuit-top"``): the top
  k = min(|B|, |F|) heads of each group's ranking in both circuits (a circuit lists each group's heads
  in importance order). Circuits sized by faithfulness can differ several-fold in size; at equal size
  ``base_in_ft`` = Jaccard's numerator over k, and its chance level is k / N for every row, so rows of
  one base compare directly. One value per pair of circuits, without a CI (noted);
* their **chance level** (``chance_overlap``, circuit rows): the same figures expected when F is replaced
  by a uniformly random set of |F| heads of the model's N (hypergeometric), and the one-sided p-value of
  an overlap at least as large. Sized circuits can grow a group to most of the model's heads; then
  ``base_in_ft`` is high whatever the heads are, and only the distance above chance says anything.

Heads are ``(layer, head)`` pairs; for ``"all"`` a head counts once however many groups list it
(distinct heads, as the paper's "67 distinct heads").

Two sources of head sets:

* circuits (one set per model). The value is the overlap of the two circuits as found. Its CI
  (``circuit_overlap(..., item_scores=...)``) comes from a bootstrap over the **discovery prompts**:
  discovery keeps the exact per-prompt path-patching effect of the heads at the top of each group's
  ranking (the verified heads in fast mode); each resample draws the prompts with replacement (the
  same draw for both models: they are scored on the same prompts), re-ranks those heads by their
  mean effect on the draw and refills each group's circuit to its reported size (heads of the
  circuit outside the stored set stay; A excludes the heads drawn for B, as discovery does); the
  overlap of the two redrawn circuits is computed per resample and the CI is its 2.5/97.5
  percentiles. Held fixed: the receivers each search patched into, the circuit sizes (top-k or
  grown), minimality's pruning, the discovery seed's noise pairs. So the CI measures how much the
  *choice of heads* depends on which prompts discovery saw, not the whole pipeline's variation.
  Without per-prompt scores (a given circuit, a stage computed before they were kept), or for a
  group whose circuit heads the rule does not give back from all the prompts (minimality pruned
  heads from the top of the ranking), there is no CI (``method="exact"``, low = high = None,
  noted); when every resample gives the same value there
  is none either (an interval of width zero would read as certainty), noted with the resample count;
* DCM-selected heads (``etbench.metrics.dcm``), which depend on the DCM seed (pair sampling, batch order).
  ``dcm_overlap`` takes one DCM run per seed for each model, pairs run i of the base with run i of the
  fine-tuned model, computes the overlap per seed pair, and reports the **mean over seed pairs** with a
  **bootstrap CI over seed pairs** (seed pairs resampled with replacement; the DCM pairs and the
  models are fixed). With a single seed there is no CI (low = high = None, noted). Seed pairs whose
  overlap is undefined (empty sets) are left out and counted in the note.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import hypergeom

from etbench.core.errors import EtbenchError
from etbench.core.stats import bootstrap_mean, format_estimate_of, format_p, to_estimate
from etbench.schema.circuit import GROUPS, Circuit, Head, group_name
from etbench.schema.scorecard import DcmSelection, Estimate, OverlapChance, OverlapScore

ALL = "all"


@dataclass(frozen=True)
class Overlap:
    """Overlap of two head sets."""

    n_base: int
    n_ft: int
    n_common: int
    n_union: int

    @property
    def base_in_ft(self) -> float | None:
        return self.n_common / self.n_base if self.n_base else None

    @property
    def jaccard(self) -> float | None:
        return self.n_common / self.n_union if self.n_union else None


def _heads(xs: Iterable[Sequence[int]]) -> set[Head]:
    out = set()
    for x in xs:
        x = tuple(x)
        if len(x) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
            raise EtbenchError(f"a head must be (layer, head) integers, got {x!r}")
        out.add((int(x[0]), int(x[1])))
    return out


def head_overlap(base: Iterable[Sequence[int]], ft: Iterable[Sequence[int]]) -> Overlap:
    """Overlap of two head collections (duplicates ignored)."""
    b, f = _heads(base), _heads(ft)
    return Overlap(len(b), len(f), len(b & f), len(b | f))


def _by_group(x: Circuit | Mapping[str, Iterable[Sequence[int]]]) -> dict[str, set[Head]]:
    if isinstance(x, Circuit):
        return {g: set(x.heads(g)) for g in GROUPS}
    if not isinstance(x, Mapping):
        raise EtbenchError(f"expected a Circuit or a mapping group -> heads, got {type(x).__name__}")
    out: dict[str, set[Head]] = {}
    for g, hs in x.items():
        out[group_name(g)] = _heads(hs)
    return out


def group_overlaps(base: Circuit | Mapping[str, Iterable[Sequence[int]]],
                   ft: Circuit | Mapping[str, Iterable[Sequence[int]]]) -> dict[str, Overlap]:
    """``{group: Overlap}`` for every group either side has (a missing group is empty), plus ``"all"``
    over distinct heads."""
    return _overlaps_of_sets(_by_group(base), _by_group(ft))


def _overlaps_of_sets(b: Mapping[str, set[Head]], f: Mapping[str, set[Head]]) -> dict[str, Overlap]:
    """``group_overlaps`` of head sets already checked: the bootstrap calls it 2000 times per card, where checking
    every head again was 85% of ``etbench submit``'s time (4 of 4.7 s on the tiny-ft card)."""
    def overlap(x: set[Head], y: set[Head]) -> Overlap:
        return Overlap(len(x), len(y), len(x & y), len(x | y))

    out = {g: overlap(b.get(g, set()), f.get(g, set())) for g in GROUPS if g in b or g in f}
    out[ALL] = overlap(set().union(*b.values()) if b else set(), set().union(*f.values()) if f else set())
    return out


def chance_overlap(o: Overlap, pool: int) -> OverlapChance | None:
    """The overlap ``o`` would have by chance: F replaced by a uniformly random |F|-subset of ``pool``
    heads (hypergeometric in |B ∩ F|). None when B is empty (base_in_ft is undefined then)."""
    if pool < max(o.n_base, o.n_ft) or o.n_common > min(o.n_base, o.n_ft):
        raise EtbenchError(f"a pool of {pool} heads cannot hold sets of {o.n_base} and {o.n_ft} heads "
                           f"sharing {o.n_common}")
    if not o.n_base:
        return None
    dist = hypergeom(pool, o.n_base, o.n_ft)
    k = np.arange(max(0, o.n_base + o.n_ft - pool), min(o.n_base, o.n_ft) + 1)
    union = o.n_base + o.n_ft - k
    jaccard = float(np.sum(dist.pmf(k) * np.where(union > 0, k / np.maximum(union, 1), 0.0)))
    return OverlapChance(pool=pool, base_in_ft=o.n_ft / pool, jaccard=jaccard,
                         p_value=float(min(1.0, dist.sf(o.n_common - 1))))


def _with_chance(scores: list[OverlapScore], found: Mapping[str, Overlap], pool: int | None) -> list[OverlapScore]:
    return scores if pool is None else [replace(s, chance=chance_overlap(found[s.group], pool)) for s in scores]


def _ranked_by_group(x: Circuit | Mapping[str, Iterable[Sequence[int]]]) -> dict[str, list[Head]]:
    """Each group's heads in the circuit's order (importance order), duplicates dropped."""
    groups = {g: x.heads(g) for g in GROUPS} if isinstance(x, Circuit) else {group_name(g): hs for g, hs in x.items()}
    return {g: list(dict.fromkeys(_ordered_heads(hs))) for g, hs in groups.items()}


def _ordered_heads(xs: Iterable[Sequence[int]]) -> list[Head]:
    xs = list(xs)
    _heads(xs)  # validates every head; the set it builds loses the order
    return [(int(x[0]), int(x[1])) for x in xs]


EQUAL_SIZE_NOTE = ("top k = min(|base|, |ft|) heads of each circuit's group ranking; one value per pair of "
                   "circuits: no CI")


def equal_size_overlap(base: Circuit | Mapping[str, Iterable[Sequence[int]]],
                       ft: Circuit | Mapping[str, Iterable[Sequence[int]]], pool: int) -> list[OverlapScore]:
    """``OverlapScore``s (``heads="circuit-top"``) of the two circuits cut to equal size per group: the top
    k = min(|B_g|, |F_g|) heads of each group's ranking; ``"all"`` over the distinct heads of those cuts.
    Each row carries its chance level over ``pool`` heads."""
    b, f = _ranked_by_group(base), _ranked_by_group(ft)
    cut_b, cut_f = {}, {}
    for g in GROUPS:
        if g in b or g in f:
            k = min(len(b.get(g, ())), len(f.get(g, ())))
            cut_b[g], cut_f[g] = b.get(g, [])[:k], f.get(g, [])[:k]
    found = group_overlaps(cut_b, cut_f)
    rows = [OverlapScore(heads="circuit-top", group=g,
                         base_in_ft=Estimate(o.base_in_ft, None, None, o.n_base, "exact",
                                             note=EQUAL_SIZE_NOTE if o.n_base else "undefined: no heads at equal size"),
                         jaccard=Estimate(o.jaccard, None, None, o.n_union, "exact",
                                          note=EQUAL_SIZE_NOTE if o.n_union else "undefined: no heads at equal size"))
            for g, o in found.items()]
    return _with_chance(rows, found, pool)


def _exact(value: float | None, n: int, what: str) -> Estimate:
    # one circuit per model: no sampling to put an interval on, so none is given (an interval of width
    # zero would read as certainty; the sampling variation of discovery is not measured here)
    note = "one discovery per model: no CI" if value is not None else f"undefined: {what}"
    return Estimate(value, None, None, n, "exact", note=note)


#: Resamples of the discovery prompts behind a circuit-overlap CI.
CIRCUIT_RESAMPLES = 2000
#: Items, resamples held fixed: the method string of a circuit-overlap CI.
CIRCUIT_CI_METHOD = "bootstrap over discovery prompts"

ItemScores = Mapping[str, Mapping[Head, Sequence[float]]]


def _item_count(scores: ItemScores) -> int | None:
    """The number of prompts behind ``scores`` (None when they disagree or there are none)."""
    ns = {len(v) for hs in scores.values() for v in hs.values()}
    return ns.pop() if len(ns) == 1 else None


#: Order in which a resample refills the groups: B before A, since A excludes B's heads (discovery's rule).
_REFILL_ORDER = ("position_transmitter", "value_fetcher", "position_detector", "structure_reader")


def _redrawn(circuit: Mapping[str, set[Head]], scores: ItemScores, draws: np.ndarray) -> list[dict[str, set[Head]]]:
    """Per resample (a row of item indices), the circuit refilled from the heads re-ranked on it."""
    ranked = {}
    for g, hs in scores.items():
        heads = list(hs)
        if heads:
            mat = np.asarray([hs[h] for h in heads], dtype=float)  # [heads, items]
            means = mat[:, draws].mean(axis=2).T  # [resamples, heads]
            ranked[g] = (heads, np.argsort(means, axis=1, kind="stable"))  # most negative effect first
    out = []
    for r in range(draws.shape[0]):
        chosen: dict[str, set[Head]] = {}
        for g in _REFILL_ORDER:
            kept = circuit.get(g, set())
            if g not in ranked:
                chosen[g] = set(kept)
                continue
            heads, order = ranked[g]
            stored = set(heads)
            fixed = {h for h in kept if h not in stored}
            k = len(kept) - len(fixed)
            barred = chosen.get("position_transmitter", set()) if g == "value_fetcher" else set()
            pick = [heads[i] for i in order[r] if heads[i] not in barred][:k]
            chosen[g] = fixed | set(pick)
        out.append(chosen)
    return out


def _bootstrap_estimate(value: float | None, n: int, what: str, samples: Sequence[float | None],
                        n_items: int, level: float = 0.95) -> Estimate:
    if value is None:
        return Estimate(None, None, None, n, CIRCUIT_CI_METHOD, note=f"undefined: {what}")
    kept = np.asarray([v for v in samples if v is not None], dtype=float)
    dropped = len(samples) - len(kept)
    held = "receivers, circuit sizes and pruning held fixed"
    if len(kept) == 0:
        return Estimate(value, None, None, n, CIRCUIT_CI_METHOD,
                        note=f"no CI: undefined in all {len(samples)} resamples of {n_items} discovery prompts")
    low, high = (float(x) for x in np.quantile(kept, [(1 - level) / 2, 1 - (1 - level) / 2]))
    parts = [f"percentile CI over {len(samples)} resamples of {n_items} discovery prompts; {held}"]
    if dropped:
        parts.append(f"{dropped} resamples undefined ({what}) and left out")
    if low == high:  # every resample agrees: a width-zero interval would read as certainty
        return Estimate(value, None, None, n, CIRCUIT_CI_METHOD,
                        note=f"no CI: the same value in all {len(kept)} defined resamples of {n_items} discovery "
                             f"prompts ({held})")
    return Estimate(value, low, high, n, CIRCUIT_CI_METHOD, level=level, note="; ".join(parts))


def circuit_overlap(base: Circuit | Mapping[str, Iterable[Sequence[int]]],
                    ft: Circuit | Mapping[str, Iterable[Sequence[int]]], *,
                    item_scores: tuple[ItemScores, ItemScores] | None = None, seed: int = 0,
                    n_resamples: int = CIRCUIT_RESAMPLES, pool: int | None = None) -> list[OverlapScore]:
    """``OverlapScore``s of two circuits, per group and ``"all"`` (n = |B|, |B ∪ F|).

    ``item_scores``: (base, ft) per-prompt discovery effects ``{group: {(layer, head): [effect per
    prompt]}}`` on the same prompts; with them each estimate gets a bootstrap CI over the prompts (see
    the module docstring), without them none (``method="exact"``). ``pool``: the model's number of
    heads; with it each row carries its chance level (``chance_overlap``)."""
    found = group_overlaps(base, ft)
    return _with_chance(_circuit_overlap(found, base, ft, item_scores, seed, n_resamples), found, pool)


def _circuit_overlap(found: Mapping[str, Overlap], base, ft, item_scores: tuple[ItemScores, ItemScores] | None,
                     seed: int, n_resamples: int) -> list[OverlapScore]:
    n_items = None
    if item_scores is not None:
        nb, nf = _item_count(item_scores[0]), _item_count(item_scores[1])
        n_items = nb if nb is not None and nb == nf and nb > 1 else None
    if n_items is None:
        return [OverlapScore(heads="circuit", group=g,
                             base_in_ft=_exact(o.base_in_ft, o.n_base, "the base set is empty"),
                             jaccard=_exact(o.jaccard, o.n_union, "both sets are empty"))
                for g, o in found.items()]
    b, f = _by_group(base), _by_group(ft)
    # The rule must give back each circuit from all its prompts; a group it does not (minimality pruned
    # heads out of the ranking's top, or the scores are not this circuit's) gets no CI: the resamples
    # would vary around another set than the one reported.
    whole = np.arange(n_items)[None, :]
    (rb0,), (rf0,) = _redrawn(b, item_scores[0], whole), _redrawn(f, item_scores[1], whole)
    off = {g for g in GROUPS if rb0.get(g, set()) != b.get(g, set()) or rf0.get(g, set()) != f.get(g, set())}
    draws = np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))
    redrawn = list(zip(_redrawn(b, item_scores[0], draws), _redrawn(f, item_scores[1], draws)))
    per_draw = [_overlaps_of_sets({g: hs for g, hs in rb.items() if g in b},
                                  {g: hs for g, hs in rf.items() if g in f}) for rb, rf in redrawn]
    out = []
    for g, o in found.items():
        if g in off or (g == ALL and off):
            why = (f"no CI: the circuit's {', '.join(group_name(x) for x in sorted(off))} heads are not the top of "
                   "their discovery ranking (pruned), so resampling the ranking does not reproduce them")
            out.append(OverlapScore(heads="circuit", group=g,
                                    base_in_ft=Estimate(o.base_in_ft, None, None, o.n_base, "exact", note=why),
                                    jaccard=Estimate(o.jaccard, None, None, o.n_union, "exact", note=why)))
            continue
        out.append(OverlapScore(
            heads="circuit", group=g,
            base_in_ft=_bootstrap_estimate(o.base_in_ft, o.n_base, "the base set is empty",
                                           [p[g].base_in_ft for p in per_draw], n_items),
            jaccard=_bootstrap_estimate(o.jaccard, o.n_union, "both sets are empty",
                                        [p[g].jaccard for p in per_draw], n_items)))
    return out


def item_scores_from_rows(rows: Iterable[Sequence]) -> dict[str, dict[Head, list[float]]]:
    """``{group: {(layer, head): scores}}`` from ``[[group, layer, head, [scores]], ...]`` or a mapping
    ``{group: [[layer, head, [scores]], ...]}`` (``DiscoveryResult.item_score_rows``)."""
    out: dict[str, dict[Head, list[float]]] = {}
    if isinstance(rows, Mapping):
        rows = [[g, *r] for g, rs in rows.items() for r in rs]
    for g, layer, head, scores in rows:
        # None: a non-finite effect; NaN ranks it last in every resample
        out.setdefault(group_name(g), {})[(int(layer), int(head))] = [float("nan") if x is None else float(x)
                                                                      for x in scores]
    return out


def _seed_estimate(values: Sequence[float | None], seed: int, n_resamples: int, what: str) -> Estimate:
    kept = [v for v in values if v is not None]
    dropped = len(values) - len(kept)
    note = f"{dropped} of {len(values)} seed pairs undefined ({what}) and left out" if dropped else ""
    if not kept:
        return Estimate(None, None, None, 0, "bootstrap-over-seeds", note=f"undefined: {what}")
    if len(kept) == 1:
        v = kept[0]
        return Estimate(v, None, None, 1, "bootstrap-over-seeds",
                        note="; ".join(x for x in (note, "one DCM seed: no CI") if x))
    if len(set(kept)) == 1:  # every seed agrees: a width-zero interval would read as certainty
        return Estimate(kept[0], None, None, len(kept), "bootstrap-over-seeds",
                        note="; ".join(x for x in (note, f"no CI: the same value at all {len(kept)} DCM seeds") if x))
    iv = bootstrap_mean(kept, seed=seed, n_resamples=n_resamples, method="percentile")
    est = to_estimate(iv)
    est.method = "bootstrap-over-seeds"
    est.note = "; ".join(x for x in (note, est.note) if x)
    return est


def dcm_overlap(base_runs: Sequence[Mapping[str, Iterable[Sequence[int]]]],
                ft_runs: Sequence[Mapping[str, Iterable[Sequence[int]]]], *, seed: int = 0,
                n_resamples: int = 2000) -> list[OverlapScore]:
    """Overlap of DCM-selected heads, per group and ``"all"``, over DCM seeds (see the module docstring).

    Each run is ``{group: selected heads}`` for one DCM seed (e.g. the heads selected for the
    desideratum that names the group's role; ``selected_by_group`` builds it from a ``DcmResult``)."""
    if not base_runs or len(base_runs) != len(ft_runs):
        raise EtbenchError(f"dcm_overlap needs one DCM run per seed for each model, paired: got "
                           f"{len(base_runs)} base and {len(ft_runs)} fine-tuned runs")
    per_seed = [group_overlaps(b, f) for b, f in zip(base_runs, ft_runs)]
    groups = [g for g in (*GROUPS, ALL) if any(g in p for p in per_seed)]
    out = []
    for g in groups:
        ovs = [p[g] for p in per_seed if g in p]
        out.append(OverlapScore(
            heads="dcm", group=g,
            base_in_ft=_seed_estimate([o.base_in_ft for o in ovs], seed, n_resamples, "the base set is empty"),
            jaccard=_seed_estimate([o.jaccard for o in ovs], seed, n_resamples, "both sets are empty")))
    return out


def dcm_seed_runs(selections: Iterable[DcmSelection], seeds: Sequence[int],
                  roles: Mapping[str, str] | None = None) -> tuple[list[dict[str, tuple[Head, ...]]],
                                                                  list[dict[str, tuple[Head, ...]]]]:
    """(base runs, fine-tuned runs) for ``dcm_overlap``: per DCM seed, in ``seeds`` order, ``{group: selected
    heads}`` (``selected_by_group``) from a scorecard's ``dcm_selections``. A seed without selections (DCM
    not run, an empty circuit) is an empty run. Scoring and ``etbench submit`` both build the DCM overlap
    from here, so the submitted card is checked by the computation that made it."""
    seeds = list(seeds)
    by_seed: dict[tuple[str, int], dict[tuple[str, str], tuple[Head, ...]]] = {
        (w, s): {} for w in ("base", "ft") for s in seeds}
    for x in selections:
        runs = by_seed.get((x.circuit, x.seed))
        if runs is None:
            raise EtbenchError(f"a DCM selection of circuit {x.circuit!r} at seed {x.seed!r}, which is not a base/ft "
                               f"circuit at one of the DCM seeds {seeds}")
        key = (group_name(x.group), x.desideratum)
        if key in runs:
            raise EtbenchError(f"two DCM selections of the {x.circuit} circuit at seed {x.seed} for {key[0]}, "
                               f"{key[1]}")
        runs[key] = tuple(sorted(_heads(x.selected_heads)))
    return ([selected_by_group(by_seed[("base", s)], roles) for s in seeds],
            [selected_by_group(by_seed[("ft", s)], roles) for s in seeds])


#: The desideratum whose DCM heads stand for each group (the paper's CMAP / semantics reading).
ROLE_DESIDERATUM: dict[str, str] = {"value_fetcher": "object_value", "position_transmitter": "positional",
                                    "position_detector": "positional", "structure_reader": "positional"}


def selected_by_group(dcm_result, roles: Mapping[str, str] | None = None) -> dict[str, tuple[Head, ...]]:
    """``{group: DCM-selected heads}`` from a ``dcm.DcmResult`` (or its ``selections()`` mapping), using each group's role desideratum
    (``ROLE_DESIDERATUM`` unless ``roles`` says otherwise); groups without that result are skipped."""
    roles = dict(ROLE_DESIDERATUM, **{group_name(g): d for g, d in (roles or {}).items()})
    sel = dcm_result.selections() if hasattr(dcm_result, "selections") else dict(dcm_result)
    return {g: tuple(sel[(g, d)]) for g, d in roles.items() if (g, d) in sel}


def format_overlap(scores: Sequence[OverlapScore]) -> str:
    from tabulate import tabulate

    def fmt(e: Estimate) -> str:
        return format_estimate_of(e, undefined="undefined", show_note=False)

    rows = [[s.heads, s.group, fmt(s.base_in_ft), format_chance(s.chance), fmt(s.jaccard), s.base_in_ft.n]
            for s in scores]
    return tabulate(rows, headers=["heads", "group", "base in ft", "by chance", "Jaccard", "n"], tablefmt="github",
                    disable_numparse=True)


def format_chance(chance: OverlapChance | None) -> str:
    """``0.767 (p 0.99)``: base in ft expected by chance, and the p-value of the observed overlap."""
    return "—" if chance is None else f"{chance.base_in_ft:.3f} (p {format_p(chance.p_value)})"
