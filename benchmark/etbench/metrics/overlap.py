"""Head overlap between the base model's and the fine-tuned model's heads (docs/method.md §5, §7).

For one group (or ``"all"``), with B the base's heads and F the fine-tuned's:

* ``base_in_ft = |B ∩ F| / |B|``: the fraction of the base's heads found again in the fine-tuned set
  (the paper's "27/40 of Llama's Value Fetcher heads are in Goat's"); undefined when B is empty.
* ``jaccard = |B ∩ F| / |B ∪ F|``; undefined when both are empty.

Heads are ``(layer, head)`` pairs; for ``"all"`` a head counts once however many groups list it
(distinct heads, as the paper's "67 distinct heads").

Two sources of head sets:

* circuits (one set per model; no sampling, so the CI is the point: ``method="exact"``);
* DCM-selected heads (``etbench.metrics.dcm``), which depend on the DCM seed (pair sampling, batch order).
  ``dcm_overlap`` takes one DCM run per seed for each model, pairs run i of the base with run i of the
  fine-tuned model, computes the overlap per seed pair, and reports the **mean over seed pairs** with a
  **bootstrap CI over seed pairs** (seed pairs resampled with replacement; the DCM pairs and the
  models are fixed). With a single seed there is no CI (low = high = value, noted). Seed pairs whose
  overlap is undefined (empty sets) are left out and counted in the note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from etbench.core.errors import EtbenchError
from etbench.core.stats import bootstrap_mean, format_estimate_of, to_estimate
from etbench.schema.circuit import GROUPS, Circuit, Head, group_name
from etbench.schema.scorecard import Estimate, OverlapScore

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
    b, f = _by_group(base), _by_group(ft)
    out = {g: head_overlap(b.get(g, ()), f.get(g, ())) for g in GROUPS if g in b or g in f}
    out[ALL] = head_overlap(set().union(*b.values()) if b else (), set().union(*f.values()) if f else ())
    return out


def _exact(value: float | None, n: int, what: str) -> Estimate:
    note = "" if value is not None else f"undefined: {what}"
    return Estimate(value, value, value, n, "exact", note=note)


def circuit_overlap(base: Circuit | Mapping[str, Iterable[Sequence[int]]],
                    ft: Circuit | Mapping[str, Iterable[Sequence[int]]]) -> list[OverlapScore]:
    """``OverlapScore``s of two circuits, per group and ``"all"`` (exact: no sampling; n = |B|, |B ∪ F|)."""
    return [OverlapScore(heads="circuit", group=g, base_in_ft=_exact(o.base_in_ft, o.n_base, "the base set is empty"),
                         jaccard=_exact(o.jaccard, o.n_union, "both sets are empty"))
            for g, o in group_overlaps(base, ft).items()]


def _seed_estimate(values: Sequence[float | None], seed: int, n_resamples: int, what: str) -> Estimate:
    kept = [v for v in values if v is not None]
    dropped = len(values) - len(kept)
    note = f"{dropped} of {len(values)} seed pairs undefined ({what}) and left out" if dropped else ""
    if not kept:
        return Estimate(None, None, None, 0, "bootstrap-over-seeds", note=f"undefined: {what}")
    if len(kept) == 1:
        v = kept[0]
        return Estimate(v, v, v, 1, "bootstrap-over-seeds",
                        note="; ".join(x for x in (note, "one DCM seed: no CI") if x))
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

    rows = [[s.heads, s.group, fmt(s.base_in_ft), fmt(s.jaccard), s.base_in_ft.n] for s in scores]
    return tabulate(rows, headers=["heads", "group", "base in ft", "Jaccard", "n"], tablefmt="github",
                    disable_numparse=True)
