"""Headline scores of a scorecard: the two numbers a leaderboard row is read and sorted by, beside its
accuracy change (docs/method.md, "Headline scores"). Computed from what a scorecard already holds; nothing
is re-measured.

* **mechanism reuse**: the overlap of the two circuits cut to equal size (``OverlapScore`` rows
  ``heads="circuit-top"``), rescaled so that chance (a random head set of the fine-tuned cut's size) reads 0
  and identity reads 1: ``(overlap - chance) / (1 - chance)``. Its 95% CI is the Wilson interval of the
  share of the base cut's k heads found again, rescaled the same way: it treats those k heads as k units,
  each found again or not. It does not cover a rerun of discovery on other prompts or seeds, which a
  scorecard does not store. (The stored bootstrap over discovery prompts cannot move the equal-size cut:
  per-prompt scores are kept for the verified heads at the top of each group only, and re-ranking them
  among themselves leaves the top k unchanged, so it gives the same value in every resample.)
* **gain explained**: the normalised CMAP gain of the full circuit with the paper's DCM-filtered heads,
  ``(patched - base) / (ft - base)`` on CMAP's items, as the scorecard holds it (paired bootstrap CI);
  undefined where the fine-tuned model's accuracy change on those items has a 95% CI containing 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from etbench.core.stats import proportion_ci
from etbench.metrics.overlap import ALL
from etbench.schema import scorecard as sc
from etbench.schema.circuit import GROUPS

#: ``Estimate.method`` of a reuse score.
REUSE_METHOD = "wilson over the base cut's heads, rescaled chance 0 .. identity 1"
REUSE_NOTE = ("k heads of the base circuit's equal-size cut taken as k units, found again or not; a rerun of "
              "discovery is not covered")


def _undefined(why: str, n: int = 0, method: str = REUSE_METHOD) -> sc.Estimate:
    return sc.Estimate(None, None, None, n, method, note=f"undefined: {why}")


def mechanism_reuse(overlap: Optional[sc.OverlapScore]) -> sc.Estimate:
    """An equal-size overlap row rescaled between chance (0) and identity (1), with its CI (module docstring).
    Below chance reads negative; undefined without the row, its chance level, base heads, or when chance is 1
    (the fine-tuned cut is every head)."""
    if overlap is None or overlap.heads != "circuit-top":
        return _undefined("no equal-size circuit overlap in the scorecard")
    share, n = overlap.base_in_ft.value, overlap.base_in_ft.n
    if share is None or not n:
        return _undefined("no base heads at equal size", n)
    if overlap.chance is None:
        return _undefined("no chance level in the scorecard", n)
    chance = overlap.chance.base_in_ft
    if chance >= 1:
        return _undefined("the fine-tuned set is every head, so chance is 1", n)
    found = round(share * n)  # the share is found/n exactly; round() undoes the float division
    ci = proportion_ci(found, n)

    def rescale(x: float) -> float:
        return (x - chance) / (1 - chance)

    return sc.Estimate(rescale(share), rescale(ci.low), rescale(ci.high), n, REUSE_METHOD, note=REUSE_NOTE)


def reuse_by_group(card: sc.Scorecard) -> dict[str, sc.Estimate]:
    """``{group: reuse}`` for every group and "all" with an equal-size overlap row, in ``GROUPS`` order."""
    rows = {o.group: o for o in card.overlap if o.heads == "circuit-top"}
    return {g: mechanism_reuse(rows[g]) for g in (*GROUPS, ALL) if g in rows}


def gain_explained(card: sc.Scorecard) -> sc.Estimate:
    """The full circuit's normalised CMAP gain (output patching, DCM heads) as the scorecard holds it."""
    row = next((c for c in card.cmap if c.group == "full" and c.variant == "output" and c.heads == "dcm"), None)
    if row is None:
        return _undefined("no CMAP of the full circuit in the scorecard", method="paired-bootstrap")
    return row.normalised_gain


@dataclass(frozen=True)
class Headline:
    """A row's answer: accuracy change (ft - base, paired, 7 boxes), mechanism reuse (all groups and per
    group) and gain explained, each an ``Estimate`` (value None = undefined, with its note)."""

    accuracy_change: Optional[sc.Estimate]
    reuse: sc.Estimate
    reuse_by_group: dict[str, sc.Estimate]
    gain_explained: sc.Estimate


def headline(card: sc.Scorecard, accuracy_change: Optional[sc.Estimate]) -> Headline:
    """The headline of ``card``; ``accuracy_change`` is its paired ft - base difference (computed from the
    per-item rows by the caller, where the paired test lives)."""
    groups = reuse_by_group(card)
    return Headline(accuracy_change, groups.get(ALL, mechanism_reuse(None)), groups, gain_explained(card))


def clear_sign(e: Optional[sc.Estimate]) -> int:
    """+1 / -1 when the 95% CI lies above / below 0, 0 when it contains 0 or is missing."""
    if e is None or e.value is None or e.low is None or e.high is None:
        return 0
    return 1 if e.low > 0 else -1 if e.high < 0 else 0


def verdict(h: Headline, name: str) -> str:
    """One sentence read off the headline's numbers and CIs (a 95% CI that excludes 0 counts as clear)."""
    acc = h.accuracy_change
    if acc is None or acc.value is None:
        first = f"{name}: no paired accuracy change (no per-item rows)"
    else:
        s = clear_sign(acc)
        first = (f"{name} {'raises' if s > 0 else 'lowers' if s < 0 else 'does not clearly change'} 7-box accuracy "
                 f"({acc.value:+.3f})")
    r = h.reuse
    if r.value is None:
        second = "its circuit reuse is undefined"
    else:
        s = clear_sign(r)
        phrase = ("reuses the base circuit above chance" if s > 0 else "reuses the base circuit less than chance"
                  if s < 0 else "does not clearly reuse the base circuit")
        # one bracket: the value, and for an unclear reuse why it is unclear (read before as "(...) (reuse x)")
        second = f"{phrase} (reuse {r.value:+.2f}{', its CI contains chance' if s == 0 else ''})"
    g = h.gain_explained
    if g.value is None:
        note = g.note or ""
        if "not clearly nonzero" in note or "equals base accuracy" in note:  # core.stats.normalised_gain's reasons
            third = "gain explained is undefined (no clear accuracy change on the CMAP prompts)"
        else:  # another reason (no CMAP of the full circuit on the card): say that one, not the accuracy change
            reason = note.removeprefix("undefined").lstrip(": ").strip()
            third = f"gain explained is undefined{f' ({reason})' if reason else ''}"
    else:
        third = (f"patching its DCM heads into the base reproduces {g.value:.2f} of its accuracy change on the "
                 "CMAP prompts")
    return f"{first}, {second}; {third}."
