"""CMAP's statistics from per-item outcomes, without a model (``etbench.metrics.cmap`` runs the patching).

One place computes a CMAP row's patched accuracy, gain and normalised gain: the patching run, the
scorecard assembly (from a stage's stored item rows, so a fix to a statistic reaches cached stages) and
the submission check all call ``cmap_score``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from etbench.core.errors import EtbenchError
from etbench.core.stats import normalised_gain, paired_bootstrap_diff, proportion_ci, to_estimate
from etbench.schema.scorecard import CmapScore

#: Resamples of the paired bootstraps behind a CMAP row's CIs.
CMAP_RESAMPLES = 2000


def cmap_score(variant: str, group: str, base_correct: Sequence[bool], ft_correct: Sequence[bool],
               patched_correct: Sequence[bool], *, seed: int = 0, n_resamples: int = CMAP_RESAMPLES,
               heads: str = "dcm") -> CmapScore:
    """Patched accuracy (Wilson), gain = patched - base and normalised gain = gain / (ft - base), each over
    the same items (paired bootstrap, seeded)."""
    base = [float(x) for x in base_correct]
    ft = [float(x) for x in ft_correct]
    patched = [float(x) for x in patched_correct]
    if not len(base) == len(ft) == len(patched):
        raise EtbenchError(f"CMAP {variant} {group}: {len(patched)} patched, {len(base)} base and {len(ft)} "
                           "fine-tuned outcomes (not the same items)")
    return CmapScore(variant=variant, group=group,
                     patched_accuracy=to_estimate(proportion_ci(int(sum(patched)), len(patched))),
                     gain=to_estimate(paired_bootstrap_diff(base, patched, seed=seed, n_resamples=n_resamples)),
                     normalised_gain=normalised_gain(base, ft, patched, seed=seed, n_resamples=n_resamples),
                     heads=heads)


def _flags(rows: Sequence[Mapping[str, Any]], **match: Any) -> list[bool]:
    picked = sorted((r for r in rows if all(r.get(k, "dcm" if k == "heads" else None) == v for k, v in match.items())),
                    key=lambda r: r["item"])
    return [bool(r["correct"]) for r in picked]


def scores_from_rows(rows: Sequence[Mapping[str, Any]], *, seed: int = 0,
                     n_resamples: int = CMAP_RESAMPLES) -> list[CmapScore]:
    """A ``CmapScore`` per patched run in a scorecard's CMAP item rows (``measure: "cmap"``; the unpatched
    base and ft runs once, as ``variant: "none"``; rows without a ``heads`` label are the DCM head set),
    in the rows' order."""
    rows = [r for r in rows if r.get("measure", "cmap") == "cmap"]
    if not rows:  # CMAP not run (nothing to patch, or a preset without it): no rows, no scores
        return []
    base, ft = _flags(rows, variant="none", model="base"), _flags(rows, variant="none", model="ft")
    if not base or not ft:
        raise EtbenchError("CMAP rows without the unpatched base and fine-tuned runs")
    runs = dict.fromkeys((r.get("heads", "dcm"), r["variant"], r["group"]) for r in rows if r["variant"] != "none")
    return [cmap_score(variant, group, base, ft, _flags(rows, variant=variant, group=group, heads=heads, model="base"),
                       seed=seed, n_resamples=n_resamples, heads=heads)
            for heads, variant, group in runs]
