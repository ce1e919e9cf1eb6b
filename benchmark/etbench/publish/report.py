"""Paired comparisons and readable reports, computed from scorecards and their per-item rows.

Nothing here runs a model. Two kinds of comparison:

* within one scorecard: the base model against the fine-tuned one on the same items (accuracy per
  box count, faithfulness of the base circuit, CMAP gain);
* across two scorecards with the same configuration: one fine-tuned model against another.

Per-item rows (``scorecard.load_items``) are read with these conventions, one row per item ×
measurement, ``correct`` a bool:

* ``measure="accuracy"``: ``model`` (base/ft), ``n_boxes``, ``item``;
* ``measure="circuit_accuracy"``: ``model``, ``circuit`` (base/ft/...), ``item`` (mean-ablated circuit run);
* ``measure="cmap"``: ``group`` (a GROUPS name or "full"), optional ``variant`` (default "output"),
  ``item`` (the base model with the fine-tuned activations patched in).

When the rows are missing, the scorecard's own estimates are shown and no paired test is made.
Figures are inline SVG made with matplotlib's Agg backend, with fixed ids so output is deterministic.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from etbench.core import stats
from etbench.core.errors import EtbenchError
from etbench.core.io import atomic_write_text
from etbench.core.stats import format_estimate_of, format_p
from etbench.metrics import headline, robustness
from etbench.metrics.chance import FAITHFULNESS_BOXES, at_chance, chance_accuracy
from etbench.metrics.overlap import format_chance
from etbench.publish.outputs import Transaction, Writer, write_tree
from etbench.publish.page import BASE_CSS, content_security_policy
from etbench.schema import scorecard as sc
from etbench.schema.circuit import GROUP_CODES

SEED = 0
N_RESAMPLES = 2000
#: ``GainTest.key`` prefix of a two-scorecard CMAP gain difference (the group follows a colon).
CMAP_GAIN_DIFFERENCE = "cmap_gain_difference"
#: Marks a faithfulness figure over a model accuracy at the chance floor (``metrics.chance.at_chance``).
CHANCE_MARK = "†"
CHANCE_LEGEND = (f"{CHANCE_MARK} faithfulness over a model accuracy at the chance floor: the 95% CI of the model's "
                 f"own accuracy on the {FAITHFULNESS_BOXES}-box faithfulness prompts contains "
                 f"1/{FAITHFULNESS_BOXES} = {chance_accuracy(FAITHFULNESS_BOXES):.3f} (guessing among the "
                 "context's objects), so the ratio compares two guesses and describes no mechanism.")


def model_at_chance(card: sc.Scorecard, model: str) -> bool:
    """Whether ``model``'s accuracy on the faithfulness prompts (the denominator of its faithfulness ratios) is at
    the chance floor; its 7-box accuracy entry stands in for a card without faithfulness rows."""
    score = next((f for f in card.faithfulness if f.model == model), None)
    accuracy = score.model_accuracy if score is not None else next(
        (a.accuracy for a in card.accuracy if a.model == model and a.n_boxes == FAITHFULNESS_BOXES), None)
    return at_chance(accuracy, FAITHFULNESS_BOXES)


def with_chance_mark(text: str, flagged: bool) -> str:
    """``text`` with ``CHANCE_MARK`` when ``flagged`` (an undefined figure, "—", has nothing to mark)."""
    return f"{text} {CHANCE_MARK}" if flagged and not text.startswith("—") else text


# ---------------------------------------------------------------------------------------------
# Per-item rows
# ---------------------------------------------------------------------------------------------

def _select(items: list[dict[str, Any]], measure: str, **match: Any) -> dict[Any, float]:
    """item id -> correct (as 0/1) for rows of ``measure`` whose fields equal ``match``.

    A ``None`` in ``match`` means "absent or None"; ``variant`` defaults to "output" when absent.
    """
    out: dict[Any, float] = {}
    for row in items:
        if row.get("measure") != measure:
            continue
        ok = True
        for key, want in match.items():
            have = row.get(key, "output" if key == "variant" else None)
            if have != want:
                ok = False
                break
        if ok:
            key = row.get("item")
            if key in out:
                raise EtbenchError(f"per-item rows: item {key!r} appears twice for {measure} {match}")
            out[key] = float(bool(row.get("correct")))
    return out


def _align(a: dict[Any, float], b: dict[Any, float]) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(set(a) & set(b), key=lambda k: (str(type(k)), k))
    return np.array([a[k] for k in keys]), np.array([b[k] for k in keys])


@dataclass(frozen=True)
class AccuracyTest:
    label: str
    n_boxes: int
    a_name: str
    b_name: str
    result: stats.McNemar

    @property
    def p_value(self) -> float:
        return self.result.p_value


@dataclass(frozen=True)
class GainTest:
    """A paired difference (of accuracies, gains or ratios) with its CI and a test where one fits."""

    label: str
    interval: stats.Interval
    p_value: Optional[float]
    test: str
    from_items: bool
    key: str = ""  # what was compared, for code that picks one test out (e.g. "cmap_gain_difference:full")
    at_chance: bool = False  # a faithfulness figure over a model accuracy at the chance floor (CHANCE_MARK)


def accuracy_tests(card: sc.Scorecard, items: list[dict[str, Any]],
                   n_boxes: Optional[tuple[int, ...]] = None) -> list[AccuracyTest]:
    """Base vs fine-tuned accuracy per box count: exact McNemar on the same items."""
    counts = sorted({a.n_boxes for a in card.accuracy}) if n_boxes is None else list(n_boxes)
    tests = []
    for k in counts:
        base = _select(items, "accuracy", model="base", n_boxes=k)
        ft = _select(items, "accuracy", model="ft", n_boxes=k)
        a, b = _align(base, ft)
        if a.size == 0:
            continue
        res = stats.mcnemar(a, b, seed=SEED, n_resamples=N_RESAMPLES)
        tests.append(AccuracyTest(f"accuracy, {k} boxes", k, card.base.ref, card.ft.ref, res))
    return tests


def row_headline(card: sc.Scorecard, test: Optional[AccuracyTest]) -> headline.Headline:
    """``card``'s headline scores, its accuracy change being ``test``'s paired 7-box difference (None without
    per-item rows). The leaderboard and the report both read a row's headline from here."""
    change = stats.to_estimate(test.result.difference) if test is not None else None
    return headline.headline(card, change)


def headline_of(card: sc.Scorecard, items: list[dict[str, Any]]) -> headline.Headline:
    tests = accuracy_tests(card, items, n_boxes=(7,))
    return row_headline(card, tests[0] if tests else None)


def _cmap_groups(card: sc.Scorecard) -> list[tuple[str, str]]:
    """(head set, group) of every output-variant CMAP row: "dcm" rows first (the paper's rule), then others."""
    order = list(sc.GROUPS) + ["full"]
    keys = {(c.heads, c.group) for c in card.cmap if c.variant == "output"}
    return sorted(keys, key=lambda k: (k[0] != "dcm", k[0], order.index(k[1]) if k[1] in order else len(order), k[1]))


def _paper_cmap_groups(card: sc.Scorecard) -> list[str]:
    """Groups of the paper's (DCM-filtered) head set, the set comparisons and the figure use."""
    return [g for heads, g in _cmap_groups(card) if heads == "dcm"]


def _select_paper_cmap(items: list[dict[str, Any]], group: str) -> dict[Any, float]:
    labelled = any("heads" in row for row in items if row.get("measure") == "cmap")
    return _select(items, "cmap", model="base", group=group, variant="output", **({"heads": "dcm"} if labelled else {}))


def _cmap_base(items: list[dict[str, Any]], n_boxes: int = 7) -> dict[Any, float]:
    """The unpatched base model on CMAP's items (rows with variant/group "none"), else its 7-box accuracy rows."""
    rows = _select(items, "cmap", model="base", variant="none", group="none")
    return rows or _select(items, "accuracy", model="base", n_boxes=n_boxes)


def cmap_tests(card: sc.Scorecard, items: list[dict[str, Any]]) -> list[GainTest]:
    """CMAP gain per group: patched base accuracy minus base accuracy, paired over items."""
    out = []
    base = _cmap_base(items)
    labelled = any("heads" in row for row in items if row.get("measure") == "cmap")
    for heads, group in _cmap_groups(card):
        # rows of scorecards before the head sets were labelled carry no "heads" field
        patched = _select(items, "cmap", model="base", group=group, variant="output",
                          **({"heads": heads} if labelled else {}))
        a, b = _align(base, patched)
        label = f"CMAP gain, {group.replace('_', ' ')}" + ("" if heads == "dcm" else f" ({heads} heads)")
        if a.size:
            ci = stats.paired_bootstrap_diff(a, b, seed=SEED, n_resamples=N_RESAMPLES)
            p = stats.mcnemar(a, b, seed=SEED, n_resamples=200).p_value
            out.append(GainTest(label, ci, p, "exact McNemar", True))
        else:
            score = next(c for c in card.cmap if c.group == group and c.variant == "output" and c.heads == heads)
            out.append(GainTest(label, stats.from_estimate(score.gain), None, "", False))
    return out


def _ratio_diff(x1, y1, x2, y2, axis=-1):
    return np.mean(x2, axis=axis) / np.mean(y2, axis=axis) - np.mean(x1, axis=axis) / np.mean(y1, axis=axis)


def faithfulness_tests(card: sc.Scorecard, items: list[dict[str, Any]], circuit: str = "base") -> list[GainTest]:
    """Faithfulness (circuit acc / model acc) of ``circuit`` on base and ft, and their difference."""
    out = []
    n_boxes = 7
    per_model = {}
    for model in ("base", "ft"):
        circ = _select(items, "circuit_accuracy", model=model, circuit=circuit)
        full = _select(items, "accuracy", model=model, n_boxes=n_boxes)
        per_model[model] = (circ, full)
        c, f = _align(circ, full)
        score = next((x for x in card.faithfulness if x.circuit == circuit and x.model == model), None)
        label = f"faithfulness of the {circuit} circuit on {model}"
        floor = model_at_chance(card, model)
        if c.size:
            out.append(GainTest(label, stats.paired_bootstrap_ratio(c, f, seed=SEED, n_resamples=N_RESAMPLES),
                                None, "", True, at_chance=floor))
        elif score is not None:
            out.append(GainTest(label, stats.from_estimate(score.faithfulness), None, "", False, at_chance=floor))
    (cb, fb), (cf, ff) = per_model["base"], per_model["ft"]
    keys = sorted(set(cb) & set(fb) & set(cf) & set(ff), key=lambda k: (str(type(k)), k))
    if keys:
        arrays = [np.array([d[k] for k in keys]) for d in (cb, fb, cf, ff)]
        ci = stats.paired_bootstrap(arrays, _ratio_diff, seed=SEED, n_resamples=N_RESAMPLES)
        out.append(GainTest(f"faithfulness difference (ft - base), {circuit} circuit", ci, None, "", True,
                            at_chance=model_at_chance(card, "base") or model_at_chance(card, "ft")))
    return out


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    title: str
    a: str
    b: str
    accuracy: list[AccuracyTest] = field(default_factory=list)
    gains: list[GainTest] = field(default_factory=list)
    holm: Optional[stats.Adjusted] = None
    notes: list[str] = field(default_factory=list)

    def p_values(self) -> list[float]:
        return [t.p_value for t in self.accuracy] + [g.p_value for g in self.gains if g.p_value is not None]


def _finish(comp: Comparison, correction: str = "holm") -> Comparison:
    """Adjust the comparison's p-values as one family: "holm" (default) or "bh" (Benjamini-Hochberg)."""
    comp.holm = stats.adjust_pvalues(comp.p_values(), correction)
    return comp


def with_correction(comp: Comparison, correction: str) -> Comparison:
    if correction not in ("holm", "bh"):
        raise EtbenchError(f"--correction must be 'holm' or 'bh', got {correction!r}")
    return _finish(comp, correction)


def _adj_name(comp: Comparison) -> str:
    return "BH" if comp.holm is not None and comp.holm.method == "bh" else "Holm"


def compare_within(card: sc.Scorecard, items: list[dict[str, Any]]) -> Comparison:
    """Base vs fine-tuned inside one scorecard."""
    comp = Comparison(f"{card.base.ref} vs {card.ft.ref}", card.base.ref, card.ft.ref)
    comp.accuracy = accuracy_tests(card, items)
    comp.gains = cmap_tests(card, items) + faithfulness_tests(card, items)
    if not items:
        comp.notes.append("no per-item rows: paired tests unavailable, CIs taken from the scorecard")
    return _finish(comp)


def compare_cards(card_a: sc.Scorecard, items_a: list[dict[str, Any]], card_b: sc.Scorecard,
                  items_b: list[dict[str, Any]], name_a: str = "", name_b: str = "") -> Comparison:
    """Two fine-tuned models (each scored against its base) on the same items. Comparable when both were
    scored under the same protocol (``scorecard.protocol``: benchmark version, preset, seed, ...),
    whichever models they scored; otherwise an error listing every difference."""
    differences = sc.protocol_differences(card_a, card_b)
    if differences:
        raise EtbenchError(f"scorecards are not comparable (scored under different protocols): "
                           f"{'; '.join(differences[:6])}" + (f"; and {len(differences) - 6} more"
                                                             if len(differences) > 6 else ""))
    a_name, b_name = name_a or card_a.ft.ref, name_b or card_b.ft.ref
    comp = Comparison(f"{a_name} vs {b_name}", a_name, b_name)
    comp.notes += different_bases_notes(card_a, card_b, a_name, b_name)
    counts = sorted({x.n_boxes for x in card_a.accuracy} & {x.n_boxes for x in card_b.accuracy})
    for k in counts:
        a, b = _align(_select(items_a, "accuracy", model="ft", n_boxes=k),
                      _select(items_b, "accuracy", model="ft", n_boxes=k))
        if a.size:
            comp.accuracy.append(AccuracyTest(f"accuracy, {k} boxes", k, a_name, b_name,
                                              stats.mcnemar(a, b, seed=SEED, n_resamples=N_RESAMPLES)))
    base_a, base_b = _cmap_base(items_a), _cmap_base(items_b)
    for group in [g for g in _paper_cmap_groups(card_a) if g in set(_paper_cmap_groups(card_b))]:
        pa = _select_paper_cmap(items_a, group)
        pb = _select_paper_cmap(items_b, group)
        keys = sorted(set(pa) & set(pb) & set(base_a) & set(base_b), key=lambda k: (str(type(k)), k))
        if not keys:
            continue
        ga = np.array([pa[k] - base_a[k] for k in keys])
        gb = np.array([pb[k] - base_b[k] for k in keys])
        ci = stats.paired_bootstrap_diff(ga, gb, seed=SEED, n_resamples=N_RESAMPLES)
        perm = stats.permutation_test_paired(ga, gb, seed=SEED, n_resamples=1999)
        comp.gains.append(GainTest(f"CMAP gain difference, {group.replace('_', ' ')}", ci, perm.p_value,
                                   "paired permutation", True, key=f"{CMAP_GAIN_DIFFERENCE}:{group}"))
    fa = [_select(items_a, "circuit_accuracy", model="ft", circuit="base"),
          _select(items_a, "accuracy", model="ft", n_boxes=7)]
    fb = [_select(items_b, "circuit_accuracy", model="ft", circuit="base"),
          _select(items_b, "accuracy", model="ft", n_boxes=7)]
    keys = sorted(set.intersection(*(set(d) for d in fa + fb)), key=lambda k: (str(type(k)), k))
    if keys:
        arrays = [np.array([d[k] for k in keys]) for d in fa + fb]
        ci = stats.paired_bootstrap(arrays, _ratio_diff, seed=SEED, n_resamples=N_RESAMPLES)
        comp.gains.append(GainTest("faithfulness difference of the base circuit", ci, None, "", True,
                                   at_chance=model_at_chance(card_a, "ft") or model_at_chance(card_b, "ft")))
    if not comp.accuracy:
        comp.notes.append("no shared per-item accuracy rows: no paired accuracy test")
    return _finish(comp)


def accuracy_test_of(comp: Comparison, n_boxes: int = 7) -> Optional[AccuracyTest]:
    """The comparison's paired accuracy test at ``n_boxes`` boxes, if its items allowed one."""
    return next((t for t in comp.accuracy if t.n_boxes == n_boxes), None)


def gain_test_of(comp: Comparison, key: str) -> Optional[GainTest]:
    """The comparison's gain test with ``key`` (e.g. ``f"{CMAP_GAIN_DIFFERENCE}:full"``), if there is one."""
    return next((g for g in comp.gains if g.key == key), None)


def base_answers_agreement(items_a: list[dict[str, Any]], items_b: list[dict[str, Any]],
                           n_boxes: int = 7) -> tuple[int, int]:
    """(items on which the two scorecards' base-model answers agree, items both have) at ``n_boxes``.

    Two scorecards of one base on the same seeded prompts hold the same base answers item by item; many
    disagreements mean their item ids do not name the same prompts (or not the same base weights)."""
    a, b = _align(_select(items_a, "accuracy", model="base", n_boxes=n_boxes),
                  _select(items_b, "accuracy", model="base", n_boxes=n_boxes))
    return int(np.sum(a == b)), int(a.size)


def format_comparison(comp: Comparison) -> str:
    """Plain text for the terminal: one line per test."""
    lines = [comp.title]
    holm = dict(zip(range(len(comp.p_values())), comp.holm.adjusted if comp.holm else ()))
    i = 0
    for t in comp.accuracy:
        r = t.result
        d = r.difference
        lines.append(
            f"  {t.label}: {t.a_name} {r.acc_a:.3f} -> {t.b_name} {r.acc_b:.3f}, "
            f"difference {_with_ci(d.value, d.low, d.high, signed=True)} (95% paired bootstrap), "
            f"exact McNemar p = {format_p(r.p_value)} ({_adj_name(comp)} {format_p(holm.get(i))}); discordant {r.a_only}/{r.b_only}, "
            f"odds ratio {_f(r.odds_ratio.value)}, n = {r.n}")
        i += 1
    for g in comp.gains:
        iv = g.interval
        extra = ""
        if g.p_value is not None:
            extra = f", {g.test} p = {format_p(g.p_value)} ({_adj_name(comp)} {format_p(holm.get(i))})"
            i += 1
        src = "" if g.from_items else " (from the scorecard)"
        value = with_chance_mark(_with_ci(iv.value, iv.low, iv.high, signed=_signed(g.label)), g.at_chance)
        lines.append(f"  {g.label}: {value} "
                     f"(95% CI, {iv.method}, n = {iv.n}{'; ' + iv.note if iv.note else ''}){src}{extra}")
    lines += [f"  note: {n}" for n in comp.notes]
    if any(g.at_chance for g in comp.gains):
        lines.append(f"  {CHANCE_LEGEND}")
    return "\n".join(lines)


def _signed(label: str) -> bool:
    return "difference" in label or "gain" in label


def _with_ci(value: Optional[float], low: Optional[float], high: Optional[float], signed: bool = False) -> str:
    """``value [low, high]``; the interval left out when it is missing or of width zero (not a CI)."""
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)) or low == high:
        return _f(value, signed)
    return f"{_f(value, signed)} [{_f(low)}, {_f(high)}]"


def _f(x: Optional[float], signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "—" if x is None else str(x)
    return f"{x:+.3f}" if signed else f"{x:.3f}"


# ---------------------------------------------------------------------------------------------
# Figures (inline SVG, deterministic)
# ---------------------------------------------------------------------------------------------

def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "etbench", "svg.fonttype": "none", "font.size": 9})
    return plt


def fig_accuracy(card: sc.Scorecard) -> Optional[str]:
    if not card.accuracy:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for model, offset, marker in (("base", -0.08, "o"), ("ft", 0.08, "s")):
        rows = sorted((a for a in card.accuracy if a.model == model and a.accuracy.value is not None),
                      key=lambda a: a.n_boxes)
        if not rows:
            continue
        x = np.array([a.n_boxes for a in rows]) + offset
        y = np.array([a.accuracy.value for a in rows])
        lo = np.array([a.accuracy.low if a.accuracy.low is not None else a.accuracy.value for a in rows])
        hi = np.array([a.accuracy.high if a.accuracy.high is not None else a.accuracy.value for a in rows])
        ref = card.base.ref if model == "base" else card.ft.ref
        # np.clip: a value outside its CI (a hand-edited card) must not make negative error bars
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], marker=marker, capsize=3,
                    label=f"{model}: {ref}")
    ax.set_xlabel("boxes per context")
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy by box count")
    return _svg(fig)


def fig_cmap(card: sc.Scorecard) -> Optional[str]:
    groups = _paper_cmap_groups(card)
    if not groups:
        return None
    plt = _mpl()
    scores = [next(c for c in card.cmap if c.group == g and c.variant == "output" and c.heads == "dcm") for g in groups]
    vals = np.array([s.gain.value if s.gain.value is not None else 0.0 for s in scores])
    lo = np.array([s.gain.low if s.gain.low is not None else v for s, v in zip(scores, vals)])
    hi = np.array([s.gain.high if s.gain.high is not None else v for s, v in zip(scores, vals)])
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(range(len(groups)), vals, yerr=[np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)], capsize=3,
           color="#4c72b0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), [g.replace("_", "\n") for g in groups])
    ax.set_ylabel("gain over base accuracy (95% CI)")
    ax.set_title("CMAP gain by group (ft -> base)")
    return _svg(fig)


#: One letter per group on the head map, as the paper names them.
GROUP_LETTERS = GROUP_CODES


def fig_overlap(card: sc.Scorecard) -> Optional[str]:
    """The two circuits as found, head by head: colour = which circuit holds the head, letters = its groups
    (A-D, in either circuit)."""
    base = next((c for c in card.circuits if c.name == "base"), None)
    ft = next((c for c in card.circuits if c.name == "ft"), None)
    if base is None or ft is None:
        return None
    plt = _mpl()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    layers, heads = max(card.base.n_layers, 1), max(card.base.n_heads, 1)
    grid = np.zeros((layers, heads))
    letters: dict[tuple[int, int], set[str]] = {}
    for code, circuit in ((1, base), (2, ft)):
        for group, hs in circuit.heads.items():
            for layer, head in hs:
                if 0 <= layer < layers and 0 <= head < heads:
                    grid[layer, head] = int(grid[layer, head]) | code
                    letters.setdefault((layer, head), set()).add(GROUP_LETTERS.get(group, "?"))
    fig, ax = plt.subplots(figsize=(max(3, heads * 0.32 + 2.5), max(2.5, layers * 0.2 + 1)))
    colours = ["#ffffff", "#4c72b0", "#dd8452", "#55a868"]
    ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=3, aspect="auto", interpolation="nearest",
              origin="lower")
    for (layer, head), marks in sorted(letters.items()):
        ax.text(head, layer, "".join(sorted(marks)), ha="center", va="center", fontsize=5, color="#111111")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    n_base, n_ft = (sum(len(h) for h in c.heads.values()) for c in (base, ft))
    ax.set_title(f"Circuit heads as found (base {n_base} nodes, ft {n_ft})")
    handles = [Patch(facecolor=colours[1], label="base circuit only"), Patch(facecolor=colours[2], label="ft circuit only"),
               Patch(facecolor=colours[3], label="both circuits")]
    handles += [Patch(facecolor="none", edgecolor="none", label=f"{letter}: {g.replace('_', ' ')}")
                for g, letter in GROUP_LETTERS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    return _svg(fig)


def fig_reuse(top: headline.Headline) -> Optional[str]:
    """Mechanism reuse per group and over all groups, with its 95% CI, between chance (0) and identity (1)."""
    shown = [(g, e) for g, e in top.reuse_by_group.items() if e.value is not None]
    if not shown:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(4.8, 3))
    xs = np.arange(len(shown))
    vals = np.array([e.value for _, e in shown])
    lo = np.array([e.low if e.low is not None else e.value for _, e in shown])
    hi = np.array([e.high if e.high is not None else e.value for _, e in shown])
    colours = ["#55a868" if g == headline.ALL else "#4c72b0" for g, _ in shown]
    ax.bar(xs, vals, yerr=[np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)], capsize=3, color=colours)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(1, color="#999999", linewidth=0.8, linestyle="--")
    ax.text(len(shown) - 0.5, 0.02, "chance", ha="right", va="bottom", fontsize=7, color="#444444")
    ax.text(len(shown) - 0.5, 0.98, "identity", ha="right", va="top", fontsize=7, color="#444444")
    ax.set_xticks(xs, [g.replace("_", "\n") for g, _ in shown])
    ax.set_ylim(min(-0.25, float(lo.min()) - 0.05), 1.1)
    ax.set_ylabel("mechanism reuse (95% CI)")
    ax.set_title("Mechanism reuse: equal-size circuits, chance 0, identity 1")
    return _svg(fig)


@dataclass(frozen=True)
class PlotPoint:
    """One model in a figure across models: named estimates (``values``), and the page that produced them.

    ``reported``: numbers published elsewhere (the paper), with no CI: drawn as hollow markers."""

    label: str
    values: dict[str, stats.Interval]
    reported: bool = False
    url: Optional[str] = None
    chance: dict[str, float] = field(default_factory=dict)  # chance level of a value, by the value's key


def has_ci(e: Optional[stats.Interval]) -> bool:
    """Whether ``e`` has a real interval: both ends known and apart (a point is not a confidence interval)."""
    return (e is not None and e.value is not None and e.low is not None and e.high is not None
            and e.high > e.low)


def _error_bar(e: stats.Interval) -> Optional[list[list[float]]]:
    # no bar at all without a real CI (never a zero-width one); np.clip as in fig_accuracy
    if not has_ci(e):
        return None
    return [[max(e.value - e.low, 0.0)], [max(e.high - e.value, 0.0)]]


_MEASURED_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                     "#ccb974", "#64b5cd")
_REPORTED_COLOUR = "#8a5a00"


def _marker_style(point: PlotPoint, i: int) -> dict[str, Any]:
    colour = _REPORTED_COLOUR if point.reported else _MEASURED_COLOURS[i % len(_MEASURED_COLOURS)]
    return {"marker": "D" if point.reported else "o", "markersize": 6, "color": colour, "ecolor": colour,
            "markeredgecolor": colour, "markerfacecolor": "none" if point.reported else colour,
            "linestyle": "none", "capsize": 3}


def _linked(container, point: PlotPoint) -> None:
    """Make the drawn marker a link to the point's report (an <a> around it in the SVG)."""
    if point.url:
        container.lines[0].set_url(point.url)


#: Label offsets (points from the marker) tried in turn: right, left, above, below, then further out.
_LABEL_OFFSETS = tuple((dx * r, dy * r) for r in (1, 2, 3) for dx, dy in
                       ((6, 3), (6, -9), (-6, 3), (-6, -9), (0, 8), (0, -14), (10, 10), (10, -16), (-10, 10),
                        (-10, -16)))


def _place_labels(fig, ax, labels: list[tuple[str, tuple[float, float], str, Optional[str]]],
                  bars: tuple[tuple[float, float, float, float], ...] = ()) -> None:
    """Annotate each (text, (x, y), colour, url) at the first offset of ``_LABEL_OFFSETS`` whose text box
    overlaps no label placed before it, no marker, no error bar (``bars``: data-space boxes x0, y0, x1, y1)
    and stays inside the axes; where none does, the offset with the least overlap (a thin leader line then
    joins label and marker when it sits far out). Deterministic: the same points give the same places."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    markers = [to_px(xy) for _, xy, _, _ in labels]
    frame = ax.get_window_extent(renderer)
    placed: list = []
    for x0, y0, x1, y1 in bars:  # an error bar as a box 3 px thick
        (px0, py0), (px1, py1) = to_px((x0, y0)), to_px((x1, y1))
        placed.append(Bbox([[min(px0, px1) - 1.5, min(py0, py1) - 1.5], [max(px0, px1) + 1.5, max(py0, py1) + 1.5]]))

    def clash(box) -> float:
        area = 0.0
        for other in placed:
            w = min(box.x1, other.x1) - max(box.x0, other.x0)
            h = min(box.y1, other.y1) - max(box.y0, other.y0)
            area += max(w, 0) * max(h, 0)
        for mx, my in markers:  # a marker as a 10 px square
            w = min(box.x1, mx + 5) - max(box.x0, mx - 5)
            h = min(box.y1, my + 5) - max(box.y0, my - 5)
            area += max(w, 0) * max(h, 0)
        outside = (max(frame.x0 - box.x0, 0) + max(box.x1 - frame.x1, 0)) * box.height + \
                  (max(frame.y0 - box.y0, 0) + max(box.y1 - frame.y1, 0)) * box.width
        return area + outside

    for text, xy, colour, url in labels:
        best = None
        for k, (dx, dy) in enumerate(_LABEL_OFFSETS):
            note = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=7, color=colour,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center")
            box = note.get_window_extent(renderer)
            cost = clash(box)
            note.remove()
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        cost, dx, dy, box = best
        arrow = {"arrowstyle": "-", "color": colour, "linewidth": 0.5} if abs(dx) + abs(dy) > 20 else None
        note = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=7, color=colour,
                           ha="left" if dx > 0 else "right" if dx < 0 else "center", arrowprops=arrow)
        if url:
            note.set_url(url)
        placed.append(box)


def fig_gain_vs_cmap(points: list[PlotPoint], x_key: str = "cmap_gain", y_key: str = "accuracy_gain") -> Optional[str]:
    """Accuracy gain (ft - base) against CMAP gain of the full circuit, one marker per model.

    A point on the diagonal: patching the fine-tuned circuit's activations into the base recovers the whole
    accuracy gain. Error bars only where the estimate has a real CI."""
    drawn = [p for p in points if p.values.get(x_key) is not None and p.values.get(y_key) is not None
             and p.values[x_key].value is not None and p.values[y_key].value is not None]
    if not drawn:
        return None
    plt = _mpl()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    ends = []
    labels = []
    bars: list[tuple[float, float, float, float]] = []
    for i, p in enumerate(drawn):
        x, y = p.values[x_key], p.values[y_key]
        style = _marker_style(p, i)
        _linked(ax.errorbar([x.value], [y.value], xerr=_error_bar(x), yerr=_error_bar(y), **style), p)
        labels.append((p.label + (" (reported)" if p.reported else ""), (x.value, y.value), style["color"], p.url))
        if has_ci(x):
            bars.append((x.low, y.value, x.high, y.value))
        if has_ci(y):
            bars.append((x.value, y.low, x.value, y.high))
        ends += [v for e in (x, y) for v in (e.value, e.low, e.high) if v is not None]
    lo, hi = min(ends + [0.0]), max(ends + [0.0])
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#999999", linewidth=0.8, linestyle="--")
    ax.axhline(0, color="#cccccc", linewidth=0.8)
    ax.axvline(0, color="#cccccc", linewidth=0.8)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    _place_labels(fig, ax, labels, tuple(bars))
    ax.set_xlabel("CMAP gain, full circuit (ft activations patched into base)")
    ax.set_ylabel("accuracy gain, ft - base, 7 boxes")
    ax.set_title("Accuracy gain vs CMAP gain (dashed: CMAP recovers the whole gain)")
    handles = [Line2D([], [], marker="o", linestyle="none", color=_MEASURED_COLOURS[0],
                      label="measured here (bars: 95% CI where one exists)")]
    if any(p.reported for p in drawn):
        handles.append(Line2D([], [], marker="D", linestyle="none", color=_REPORTED_COLOUR, markerfacecolor="none",
                              label="reported by the paper (no CI)"))
    # below the axes: inside, "best" avoids markers but not their labels
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    return _svg(fig)


def fig_group_overlap(points: list[PlotPoint], panels: tuple[tuple[str, str], ...],
                      groups: tuple[str, ...] = tuple(sc.GROUPS)) -> Optional[str]:
    """Per-group head overlap (share of the base's heads in the fine-tuned model's set), one marker per
    model, one panel per head set in ``panels`` ((key, title); values keyed ``"{key}/{group}"``). Panels
    with no value are left out; error bars only where the estimate has a real CI."""
    shown = [(key, title) for key, title in panels
             if any(p.values.get(f"{key}/{g}") is not None and p.values[f"{key}/{g}"].value is not None
                    for p in points for g in groups)]
    if not shown:
        return None
    plt = _mpl()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.8 * len(shown) + 1.8, 3.8), sharey=True, squeeze=False)
    from matplotlib.lines import Line2D

    width = 0.7  # of the band each group's markers spread over
    in_legend: dict[int, Line2D] = {}  # one marker-only entry per model (an error bar there would read as data)
    has_chance = False
    for ax, (key, title) in zip(axes[0], shown):
        for i, p in enumerate(points):
            for j, g in enumerate(groups):
                e = p.values.get(f"{key}/{g}")
                if e is None or e.value is None:
                    continue
                x = j - width / 2 + width * (i + 0.5) / len(points)
                style = _marker_style(p, i)
                chance = p.chance.get(f"{key}/{g}")
                if chance is not None:  # what a random head set of the same size would share
                    half = 0.5 * width / len(points)
                    ax.hlines(chance, x - half, x + half, colors=style["color"], linewidth=2.2, alpha=0.55)
                    has_chance = True
                _linked(ax.errorbar([x], [e.value], yerr=_error_bar(e), **style), p)
                in_legend.setdefault(i, Line2D([], [], label=p.label, **{k: v for k, v in style.items()
                                                                          if k not in ("ecolor", "capsize")}))
        ax.set_xticks(range(len(groups)), [g.replace("_", "\n") for g in groups])
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.grid(axis="y", color="#eeeeee")
    axes[0][0].set_ylabel("base heads also in the ft set")
    handles = [in_legend[i] for i in sorted(in_legend)]
    if has_chance:
        handles.append(Line2D([], [], color="#555555", linewidth=2.2, alpha=0.55,
                              label="bar: chance (random heads, same size)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle("Head overlap per group (hollow: from the paper's published circuits, no CI)", fontsize=9, y=1.03)
    return _svg(fig)


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------

_WORDING_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3")


def _bar(e: sc.Estimate) -> list[list[float]]:
    """An error bar around ``e.value`` (zero where the estimate has no interval; clipped, never negative)."""
    lo = e.low if e.low is not None else e.value
    hi = e.high if e.high is not None else e.value
    return [[max(0.0, e.value - lo)], [max(0.0, hi - e.value)]]


def fig_robustness(rows: list[tuple[str, robustness.Robustness]]) -> Optional[str]:
    """Left: accuracy per wording (95% Wilson CI) of each base (once) and each row's fine-tune. Right: each row's
    robustness figures (docs/method.md §14): the gain carry-over and the fine-tuned circuit's carry-over, both
    held-out wordings minus the paper's (0: the held-out wordings behave as the paper's), 95% CIs."""
    if not rows:
        return None
    plt = _mpl()
    models: list[tuple[str, robustness.RobustnessSummary, str]] = []  # (label, summary, model)
    for name, rob in rows:
        if not any(label == f"base: {rob.base}" for label, _, _ in models):
            models.append((f"base: {rob.base}", rob.summary, "base"))
    models += [(name, rob.summary, "ft") for name, rob in rows]
    wordings = rows[0][1].wordings
    height = 0.9 + 0.32 * len(models)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.6, max(2.6, height)), sharey=False,
                                      gridspec_kw={"width_ratios": [1.15, 1]})
    for k, w in enumerate(wordings):
        ys, xs, bars = [], [], [[], []]
        for i, (_, summary, model) in enumerate(models):
            e = summary.pick_accuracy(w, model).accuracy
            if e.value is None:
                continue
            b = _bar(e)
            ys.append(i + (k - (len(wordings) - 1) / 2) * 0.22)
            xs.append(e.value)
            bars[0] += b[0]
            bars[1] += b[1]
        left.errorbar(xs, ys, xerr=bars, marker="os^D"[k % 4], linestyle="none", capsize=2,
                      color=_WORDING_COLOURS[k % len(_WORDING_COLOURS)], label=w + (" (held out)" if k else ""))
    left.set_yticks(range(len(models)), [label for label, _, _ in models])
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel(f"accuracy, 7 boxes (95% CI; n = {rows[0][1].n} per wording)")
    left.set_title("Accuracy by wording")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(wordings), frameon=False)
    names = [name for name, _ in rows]
    for k, (label, pick) in enumerate((("gain carry-over (ft − base)", lambda r: r.summary.gain_carryover),
                                       ("fine-tuned circuit's faithfulness carry-over",
                                        lambda r: r.summary.carryover["ft"]))):
        ys, xs, bars = [], [], [[], []]
        for i, (_, rob) in enumerate(rows):
            e = pick(rob)
            if e.value is None:
                continue
            b = _bar(e)
            ys.append(i + (k - 0.5) * 0.3)
            xs.append(e.value)
            bars[0] += b[0]
            bars[1] += b[1]
        right.errorbar(xs, ys, xerr=bars, marker="os"[k], linestyle="none", capsize=2,
                       color=_MEASURED_COLOURS[k + 3], label=label)
    right.axvline(0, color="#999999", linewidth=0.8, linestyle="--")
    right.set_yticks(range(len(rows)), names)
    right.invert_yaxis()
    right.set_xlabel("held-out wordings minus the paper's (95% CI)")
    right.set_title("Robustness")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)
    fig.tight_layout()
    return _svg(fig)


ROBUSTNESS_ABSENT = ("Template robustness and model diffing: not measured for this row (no robustness.json beside "
                     "its scorecard; `etbench robustness ROW` measures them, docs/method.md §14-15).")


@dataclass(frozen=True)
class Doc:
    markdown: str
    html: str


def format_sizing(sizing: Optional[dict[str, Any]]) -> str:
    """A circuit's size search in one line: target, reached or not (and why), and the curve over size that is
    its record (nodes → faithfulness). The target is null when the model or the form scores 0 (a NaN ratio)."""
    if not sizing:
        return "—"
    target = sizing.get("target_faithfulness")
    text = (f"target {'undefined' if target is None else f'{target:.3f}'} "
            f"{'reached' if sizing.get('reached') else 'not reached'}")
    if sizing.get("note"):
        text += f": {sizing['note']}"
    curve = [p for p in sizing.get("curve") or [] if p.get("faithfulness") is not None]
    if curve:
        text += "; curve (nodes→faithfulness) " + ", ".join(f"{p['size']}→{p['faithfulness']:.3f}" for p in curve)
    return text


def _tables(card: sc.Scorecard) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    counts = sorted({a.n_boxes for a in card.accuracy})
    rows = []
    for k in counts:
        get = {a.model: a.accuracy for a in card.accuracy if a.n_boxes == k}
        rows.append([str(k), format_estimate_of(get.get("base")), format_estimate_of(get.get("ft"))])
    if rows:
        tables.append(("Accuracy", ["boxes", f"base ({card.base.ref})", f"ft ({card.ft.ref})"], rows))
    rows = [[c.model, c.form, format_estimate_of(c.model_accuracy), format_estimate_of(c.every_head_every_position),
             format_estimate_of(c.form_accuracy), format_estimate_of(c.no_heads_accuracy),
             with_chance_mark(format_estimate_of(c.form_faithfulness), at_chance(c.model_accuracy)),
             with_chance_mark(format_estimate_of(c.form_faithfulness_mib), at_chance(c.model_accuracy))]
            for c in card.ceilings]
    if rows:
        tables.append(("Ceilings of the circuit form (every head kept at the form's positions; no heads = the floor)",
                       ["model", "form", "model acc", "every head, every position", "form acc", "no heads acc",
                        "form faithfulness", "form faithfulness (MIB)"], rows))
    rows = [[c.name, c.size_rule, str(sum(len(h) for h in c.heads.values())),
             str(sum(int(v) for v in c.sizing["chosen"].values())) if isinstance((c.sizing or {}).get("chosen"), dict)
             else "—", format_sizing(c.sizing)]
            for c in card.circuits]
    if rows:
        tables.append(("Circuits (nodes: the circuit as evaluated; at the curve's target: before A gives up the heads "
                       "also chosen for B)", ["circuit", "size rule", "nodes", "nodes at the curve's target", "sizing"],
                       rows))
    rows = [[f.circuit, f.model, format_estimate_of(f.model_accuracy), format_estimate_of(f.circuit_accuracy),
             with_chance_mark(format_estimate_of(f.faithfulness), at_chance(f.model_accuracy)),
             with_chance_mark(format_estimate_of(f.faithfulness_mib), at_chance(f.model_accuracy)),
             format_estimate_of(f.random_circuit_accuracy)] for f in card.faithfulness]
    if rows:
        tables.append(("Faithfulness (mean ablation outside the circuit)",
                       ["circuit", "model", "model acc", "circuit acc", "faithfulness", "faithfulness (MIB)",
                        "random circuit acc"], rows))
    rows = [[o.heads, o.group, format_estimate_of(o.base_in_ft), format_chance(o.chance), format_estimate_of(o.jaccard)]
            for o in card.overlap]
    if rows:
        tables.append(("Head overlap (by chance: a random head set of the fine-tuned set's size, and the p-value "
                       "of an overlap this large)", ["heads", "group", "base in ft", "by chance (p)", "Jaccard"], rows))
    rows = [[d.circuit, d.group, d.desideratum, str(len(d.selected_heads)), format_estimate_of(d.test_accuracy)]
            for d in card.dcm]
    if rows:
        tables.append(("DCM (desiderata-based component masking)",
                       ["circuit", "group", "desideratum", "selected heads", "test accuracy"], rows))
    rows = [[s.model, s.group, s.desideratum, str(len(s.heads)), format_estimate_of(s.accuracy)] for s in card.semantics]
    if rows:
        tables.append(("DCM semantics check (base DCM heads patched into each model; min/max over repeats)",
                       ["into", "group", "desideratum", "heads", "accuracy"], rows))
    rows = [[c.heads, c.variant, c.group, format_estimate_of(c.patched_accuracy), format_estimate_of(c.gain),
             format_estimate_of(c.normalised_gain)] for c in card.cmap]
    if rows:
        tables.append(("CMAP (ft activations patched into base; heads: dcm = the paper's DCM-filtered set, "
                       "circuit = every head of the ft circuit)",
                       ["heads", "variant", "group", "patched acc", "gain", "normalised gain"], rows))
    e = card.edges
    if e is not None:
        rows = [[r.type, f"{r.k} of {r.n_candidates}", format_estimate_of(r.overlap), format_chance(r.chance),
                 format_estimate_of(r.rewiring), format_estimate_of(r.base_edges_share)] for r in e.rows]
        nodes = ", ".join(f"{GROUP_CODES[g]} {len(hs)}" for g, hs in e.nodes.items())
        added = [a for a in card.provenance.added if a.section == "edges"]
        tables.append((f"Edges between the groups (path patching, {e.n} prompts; nodes: each group's top heads of both "
                       f"circuits, {nodes}; top edges: the {e.top_fraction:g} largest |effect| per type; by chance: "
                       "a random top set of the same size)"
                       + (f"; added to this card later by etbench {added[0].etbench_version}" if added else ""),
                       ["edges", "top k of M", "overlap", "by chance (p)", "rewiring", "base edges' share"], rows))
    return tables


def _comparison_rows(comp: Comparison) -> list[list[str]]:
    holm = list(comp.holm.adjusted) if comp.holm else []
    rows, i = [], 0
    for t in comp.accuracy:
        r = t.result
        rows.append([t.label, _with_ci(r.difference.value, r.difference.low, r.difference.high, signed=True),
                     f"exact McNemar p = {format_p(r.p_value)}", format_p(holm[i]) if i < len(holm) else "—",
                     f"odds ratio {_f(r.odds_ratio.value)}, Cohen's g {r.cohens_g:+.3f}, n = {r.n}"])
        i += 1
    for g in comp.gains:
        iv = g.interval
        p = "—"
        adj = "—"
        if g.p_value is not None:
            p, adj = f"{g.test} p = {format_p(g.p_value)}", format_p(holm[i]) if i < len(holm) else "—"
            i += 1
        rows.append([g.label, with_chance_mark(_with_ci(iv.value, iv.low, iv.high, signed=_signed(g.label)), g.at_chance),
                     p, adj,
                     f"{iv.method}, n = {iv.n}" + (f"; {iv.note}" if iv.note else "")
                     + ("" if g.from_items else ", from the scorecard")])
    return rows


_COMP_HEADER = ["comparison", "difference [95% CI]", "test", "Holm-adjusted p", "effect size / notes"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in esc]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSP = content_security_policy(scripts=False)
_CSS = (BASE_CSS + "figure{display:inline-block;margin:0 1em 1em 0}svg{max-width:100%;height:auto}"
        "#summary td:nth-child(2){white-space:nowrap}")  # a headline's CI on one line


@dataclass(frozen=True)
class Summary:
    """The block a report opens with: a verdict, a table of the headline scores, notes, the key figure."""

    verdict: str
    rows: list[list[str]]
    notes: list[str]
    figure: Optional[tuple[str, str]] = None  # (label, svg)


_SUMMARY_HEADER = ["score", "value [95% CI]", "what it says"]


def _document(title: str, intro: list[str], tables, comp: Optional[Comparison], figures: dict[str, str],
              summary: Optional[Summary] = None) -> Doc:
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if summary is not None:  # the answer first: verdict, headline scores, the key figure
        md += ["## Summary", "", f"**{summary.verdict}**", ""] + _md_table(_SUMMARY_HEADER, summary.rows) + [""]
        md += [f"- {n}" for n in summary.notes] + ([""] if summary.notes else [])
        body += ['<section id="summary"><h2>Summary</h2>', f'<p class="verdict"><strong>{html.escape(summary.verdict)}'
                 "</strong></p>", _html_table(_SUMMARY_HEADER, summary.rows)]
        if summary.figure is not None:
            md += [f"The key figure ({summary.figure[0]}) is in the HTML version of this report.", ""]
            body.append(f'<figure aria-label="{html.escape(summary.figure[0])}">{summary.figure[1]}</figure>')
        body += [f"<p>{html.escape(n)}</p>" for n in summary.notes]
        body.append("</section>")
    md += intro + [""]
    body += [f"<p>{html.escape(p)}</p>" for p in intro if p]
    if comp is not None:
        rows = _comparison_rows(comp)
        header = [h.replace("Holm", _adj_name(comp)) for h in _COMP_HEADER]
        md += ["## Paired comparison", ""] + _md_table(header, rows) + [""]
        md += [f"- {n}" for n in comp.notes] + ([""] if comp.notes else [])
        body += ["<h2>Paired comparison</h2>", _html_table(header, rows)]
        body += [f"<p>{html.escape(n)}</p>" for n in comp.notes]
    if figures:
        md += ["## Figures", "", "Figures are in the HTML version of this report.", ""]
        body += ["<h2>Figures</h2>"] + [f'<figure aria-label="{html.escape(k)}">{v}</figure>' for k, v in figures.items()]
    for name, header, rows in tables:
        md += [f"## {name}", ""] + _md_table(header, rows) + [""]
        body += [f"<h2>{html.escape(name)}</h2>", _html_table(header, rows)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    return Doc("\n".join(md).rstrip() + "\n", page)


def _share(flags: dict[Any, float]) -> Optional[float]:
    return sum(flags.values()) / len(flags) if flags else None


def prompt_sets_note(card: sc.Scorecard, items: list[dict[str, Any]]) -> Optional[str]:
    """Why one model has several accuracies in a report: each figure is over its own prompts. Read from the
    per-item rows and the circuits' sizing records; None without per-item rows."""
    parts = []
    for model, ref in (("base", card.base.ref), ("ft", card.ft.ref)):
        acc = _select(items, "accuracy", model=model, n_boxes=FAITHFULNESS_BOXES)
        if not acc:
            return None
        own = [f"{_share(acc):.3f} of the {len(acc)} accuracy prompts"]
        faith = {k: v for k, v in acc.items() if k in _select(items, "circuit_accuracy", model=model, circuit="base")}
        if faith:
            own.append(f"{_share(faith):.3f} of the {len(faith)} faithfulness prompts")
        sizing = next((c.sizing for c in card.circuits if c.name == model and c.sizing), None)
        if sizing and sizing.get("model_accuracy") is not None:
            own.append(f"{sizing['model_accuracy']:.3f} of the {sizing.get('n', '?')} held-out sizing prompts")
        parts.append(f"{ref} answers " + ", ".join(own))
    acc_ids = set(_select(items, "accuracy", model="base", n_boxes=FAITHFULNESS_BOXES))
    faith_ids = set(_select(items, "circuit_accuracy", model="base", circuit="base"))
    where = ""
    if faith_ids and faith_ids <= acc_ids:
        first = sorted(acc_ids, key=lambda k: (str(type(k)), k))[:len(faith_ids)]
        which = f"the first {len(faith_ids)}" if sorted(faith_ids, key=lambda k: (str(type(k)), k)) == first \
            else f"{len(faith_ids)}"
        cmap_ids = set(_select(items, "cmap", model="base", variant="none", group="none"))
        named = "faithfulness (and CMAP)" if cmap_ids == faith_ids else "faithfulness"
        where = (f" The {named} prompts are {which} of the {len(acc_ids)} accuracy prompts, so "
                 "the two accuracies differ only by which prompts they count; each ratio divides by the accuracy "
                 "on its own prompts. Circuits are sized on other prompts (a held-out stream), never on those "
                 "they are evaluated on.")
    return "; ".join(parts) + "." + where


def circuit_size_note(circuit: sc.CircuitSummary) -> Optional[str]:
    """How a circuit's node count relates to its sizing curve: the curve counts the nodes at the chosen scale
    before A gives up the heads also chosen for B (discovery's rule, docs/method.md §4)."""
    sizing = circuit.sizing or {}
    chosen = sizing.get("chosen")
    if not isinstance(chosen, dict):
        return None
    nodes = sum(len(h) for h in circuit.heads.values())
    at_curve = sum(int(v) for v in chosen.values())
    if at_curve == nodes:
        return f"the {circuit.name} circuit's {nodes} nodes are the sizing curve's point at the chosen scale"
    moved = ", ".join(f"{GROUP_LETTERS.get(g, g)} {int(chosen[g])} → {len(circuit.heads.get(g, ()))}"
                      for g in sorted(chosen) if int(chosen[g]) != len(circuit.heads.get(g, ())))
    return (f"the {circuit.name} circuit holds {nodes} nodes where its sizing curve reached the target at "
            f"{at_curve}: the curve counts each group's top heads at the chosen scale, then A gives up the heads "
            f"also chosen for B (discovery's rule; {moved})")


def _headline_rows(top: headline.Headline, card: sc.Scorecard) -> list[list[str]]:
    acc = top.accuracy_change
    base_acc, ft_acc = (next((a.accuracy for a in card.accuracy if a.model == m and a.n_boxes == FAITHFULNESS_BOXES),
                             None) for m in ("base", "ft"))
    rows = [["Δaccuracy (ft − base, 7 boxes)", format_estimate_of(acc, signed=True),
             f"{card.base.ref} {format_estimate_of(base_acc)} → {card.ft.ref} {format_estimate_of(ft_acc)} on the same "
             "prompts (paired)"],
            ["mechanism reuse (all groups)", format_estimate_of(top.reuse, signed=True, show_note=False),
             "equal-size circuits: 0 = a random head set, 1 = the base circuit's own heads"]]
    for g, e in top.reuse_by_group.items():
        if g != headline.ALL:
            rows.append([f"… {g.replace('_', ' ')} ({GROUP_LETTERS.get(g, '?')})",
                         format_estimate_of(e, signed=True, show_note=False), f"{e.n} base heads at equal size"])
    g = top.gain_explained
    rows.append(["gain explained", format_estimate_of(g, undefined="undefined", show_note=False),
                 g.note if g.value is None else "share of the accuracy change (on CMAP's prompts) that patching the "
                 "fine-tune's DCM heads into the base reproduces"])
    return rows


def report_summary(card: sc.Scorecard, items: list[dict[str, Any]], name: str) -> Summary:
    top = headline_of(card, items)
    notes = ["Headline scores are defined in docs/method.md (\"Headline scores\"); the reuse CI treats the base "
             "cut's heads as units (Wilson) and does not cover a rerun of discovery."]
    prompts = prompt_sets_note(card, items)
    if prompts:
        notes.append(prompts)
    notes += [n[0].upper() + n[1:] + "." for n in (circuit_size_note(c) for c in card.circuits) if n]
    figure = fig_reuse(top)
    return Summary(headline.verdict(top, name), _headline_rows(top, card), notes,
                   ("mechanism reuse by group", figure) if figure else None)


def scorecard_report(card: sc.Scorecard, items: list[dict[str, Any]], title: str = "",
                     submission: Optional[dict[str, Any]] = None,
                     robust: Optional[robustness.Robustness] = None) -> Doc:
    """Report of one scorecard: a summary (verdict, headline scores, key figure), the base-vs-ft paired
    comparison, figures, then every table; ``robust`` (the row's checked ``robustness.json``) adds the
    template-robustness and model-diffing sections after the circuits' (or a line saying the row has none)."""
    title = title or f"{card.ft.ref} (fine-tuned from {card.base.ref})"
    intro = [f"etbench report. Base model: {card.base.ref} ({card.base.architecture}, {card.base.n_layers} layers, "
             f"{card.base.n_heads} heads); fine-tuned: {card.ft.ref}. Benchmark version "
             f"{card.provenance.benchmark_version}, config hash {card.config_hash}."]
    if submission:
        ft = submission.get("fine_tuning", {})
        intro.append(f"Fine-tuning: {ft.get('method', '?')} on {ft.get('data', '?')}. "
                     f"License: {submission.get('license', '?')}. Contact: {submission.get('contact', '?')}.")
    intro.append("Differences are fine-tuned minus base on the same items; p-values are Holm-adjusted "
                 "across the tests of this report.")
    comp = compare_within(card, items)
    if (any(g.at_chance for g in comp.gains) or any(at_chance(f.model_accuracy) for f in card.faithfulness)
            or any(at_chance(c.model_accuracy) for c in card.ceilings)):
        intro.append(CHANCE_LEGEND)
    figures = {k: v for k, v in (("CMAP gain by group", fig_cmap(card)), ("circuit head overlap", fig_overlap(card)),
                                 ("accuracy by box count", fig_accuracy(card)),
                                 ("accuracy by wording and robustness",
                                  fig_robustness([(title, robust)] if robust else []))) if v}
    tables = _tables(card)
    if robust is None:
        intro.append(ROBUSTNESS_ABSENT)
    else:  # beside the circuit groups: after the circuits' and faithfulness tables
        at = next((i + 1 for i, t in enumerate(tables) if t[0].startswith("Faithfulness")), len(tables))
        tables[at:at] = robustness.robustness_tables(robust)
    return _document(title, intro, tables, comp, figures, report_summary(card, items, title))


def comparison_report(comp: Comparison, cards: tuple[sc.Scorecard, ...] = ()) -> Doc:
    intro = [f"Paired comparison of {comp.a} and {comp.b} on the same items. Differences are "
             f"{comp.b} minus {comp.a}; p-values Holm-adjusted across this report's tests."]
    if any(g.at_chance for g in comp.gains):
        intro.append(CHANCE_LEGEND)
    figures = {}
    for card in cards:
        for k, fig in ((f"accuracy by box count: {card.ft.ref}", fig_accuracy(card)),
                       (f"CMAP gain by group: {card.ft.ref}", fig_cmap(card)),
                       (f"circuit head overlap: {card.ft.ref}", fig_overlap(card))):
            if fig:
                figures[k] = fig
    return _document(comp.title, intro, [], comp, figures)


#: ``etbench report --out DIR`` and ``etbench compare --out DIR``: each replaces only the report files its own
#: manifest in DIR lists (``outputs.write_tree``), never a file of the same name that it did not write.
REPORT_WRITER = Writer("etbench report", ".etbench-report-manifest.json")
COMPARE_WRITER = Writer("etbench compare", ".etbench-compare-manifest.json")


def write_doc(doc: Doc, out_dir: Path, stem: str = "report", writer: Optional[Writer] = None) -> list[Path]:
    """``<stem>.md`` and ``<stem>.html`` in ``out_dir``. With ``writer``, both are written all or nothing
    through ``outputs.write_tree`` (a file of the same name that ``writer`` did not write is refused);
    without, each is replaced atomically (``etbench score``, whose output directory is its own)."""
    out_dir = Path(out_dir)
    files = {f"{stem}.md": doc.markdown, f"{stem}.html": doc.html}
    if writer is None:
        return [atomic_write_text(out_dir / name, text) for name, text in files.items()]
    with Transaction() as txn:
        return write_tree(out_dir, {name: text.encode("utf-8") for name, text in files.items()}, txn, writer)


# ---------------------------------------------------------------------------------------------
# Finding scorecards for the CLI
# ---------------------------------------------------------------------------------------------

@dataclass
class Found:
    name: str
    card: sc.Scorecard
    items: list[dict[str, Any]]
    path: Path

    def robustness(self) -> Optional[robustness.Robustness]:
        """The ``robustness.json`` beside the scorecard, checked against it (None when there is none)."""
        return robustness.load_checked(self.path, self.card, self.items)


def _load_found(path: Path, name: str = "") -> Found:
    path = Path(path)
    if path.is_dir():
        path = path / "scorecard.json"
    card = sc.load(path)
    items_path = path.parent / card.items_file
    items = sc.load_items(path, card) if items_path.is_file() else []
    return Found(name or card.ft.ref, card, items, path)


def stored_cards(stores: list[Path]) -> list[Found]:
    found = []
    for store in stores:
        store = Path(store)
        if (store / "scorecard.json").is_file():
            found.append(_load_found(store))
        elif store.is_dir():
            for sub in sorted(store.iterdir()):
                if (sub / "scorecard.json").is_file():
                    found.append(_load_found(sub, sub.name))
    return found


def check_stores_exist(stores: list[Path]) -> None:
    """When no store exists (the defaults are relative: run outside the checkout), say so in one line rather than
    suggest scoring a stored row again."""
    missing = [str(s) for s in stores if not Path(s).exists()]
    if stores and len(missing) == len(stores):
        raise EtbenchError(f"no scorecard store here: {', '.join(missing)} {'does' if len(missing) == 1 else 'do'} "
                           f"not exist (relative to {Path.cwd()}): run from the etbench checkout, pass --store DIR, or score a "
                           "pair first (`etbench score --base BASE --ft FT --out DIR`)")


def resolve_pair(a: str, b: str, stores: list[Path]) -> Comparison:
    """``a``/``b``: scorecard paths, stored submission names, or model refs.

    Refs that are the base and fine-tuned models of one stored scorecard compare within it;
    otherwise each side must name a scorecard, and the two fine-tuned models are compared. Two sides that
    are one scorecard (the same argument twice, one file, or one row name) are an error (``check_two_sides``).
    """
    def as_path(x: str) -> Optional[Path]:
        p = Path(x)
        return p if (p.is_file() and p.suffix == ".json") or (p / "scorecard.json").is_file() else None

    if a == b:
        raise EtbenchError(f"compare needs two different sides, got {a!r} twice: {SAME_SIDE_HINT}")
    pa, pb = as_path(a), as_path(b)
    if pa is None or pb is None:
        cards = stored_cards(stores)
        if pa is None and pb is None:
            for f in cards:
                if f.card.base.ref == a and f.card.ft.ref == b:
                    return compare_within(f.card, f.items)
        sides = []
        for x, p in ((a, pa), (b, pb)):
            if p is not None:
                sides.append(_load_found(p))
                continue
            match = [f for f in cards if f.name == x] or [f for f in cards if f.card.ft.ref == x]
            if not match:
                where = ", ".join(str(s) for s in stores) or "(no stores)"
                check_stores_exist(stores)
                stored = {f.name for f in cards} | {f.card.ft.ref for f in cards}
                if pa is None and pb is None and not {a, b} & stored:  # two refs, neither a stored row
                    raise EtbenchError(f"no scorecard of {a!r} vs {b!r} in {where}: run `etbench score --base {a} "
                                       f"--ft {b} --out DIR`, then `etbench compare {a} {b} --store DIR`")
                names = sorted({f.name for f in cards})
                known = f" (stored: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names else ""
                raise EtbenchError(f"no scorecard for {x!r} in {where}{known}: pass a stored name, a scorecard.json "
                                   "path, or score it first (`etbench score --ft MODEL --out DIR`, then --store DIR)")
            if len(match) > 1:
                raise EtbenchError(f"{x!r} matches {len(match)} scorecards: pass a scorecard path instead")
            sides.append(match[0])
    else:
        sides = [_load_found(pa), _load_found(pb)]
    fa, fb = sides
    check_two_sides(fa, fb)
    return compare_cards(fa.card, fa.items, fb.card, fb.items, fa.name, fb.name)


SAME_SIDE_HINT = ("a scorecard against itself differs by exactly 0 with intervals of width zero; for its base "
                  "against its fine-tuned model use `etbench compare BASE_REF FT_REF` or `etbench report`")


def different_bases_notes(card_a: sc.Scorecard, card_b: sc.Scorecard, a_name: str, b_name: str) -> list[str]:
    """A comparison of fine-tunes of different bases is allowed (same protocol, same prompts) but reads
    differently: what stays comparable, and what does not, in one note; [] for fine-tunes of one base."""
    base_a, base_b = card_a.base, card_b.base
    if (base_a.ref, base_a.revision) == (base_b.ref, base_b.revision):
        return []
    arch = (f"architectures {base_a.architecture} and {base_b.architecture}"
            if base_a.architecture != base_b.architecture else f"both {base_a.architecture}")
    return [f"{a_name} and {b_name} are fine-tunes of different bases ({base_a.ref} and {base_b.ref}; {arch}). "
            "Accuracy is compared on the same prompts and stays comparable as behaviour; CMAP gains and "
            "faithfulness are each measured against the fine-tune's own base, so their differences compare how "
            "much each fine-tune changed its own base, not one mechanism; circuits and head overlaps name "
            "different heads and are not compared."]


def check_two_sides(fa: Found, fb: Found) -> None:
    """The two sides of a comparison are two scorecards: not one file (however it was named) and not two copies
    of one row (the same submission name, or the same fine-tuned ref for a scorecard given by path)."""
    if fa.path.resolve() == fb.path.resolve():
        raise EtbenchError(f"compare: both sides are the same scorecard file {fa.path.resolve()}: {SAME_SIDE_HINT}")
    if fa.name == fb.name:
        raise EtbenchError(f"compare: both sides are the row {fa.name!r} ({fa.path} and {fb.path}): "
                           f"{SAME_SIDE_HINT}")


def find_one(ref: str, stores: list[Path]) -> Found:
    """A scorecard path or directory, or a stored submission name / fine-tuned ref."""
    p = Path(ref)
    if (p.is_file() and p.suffix == ".json") or (p / "scorecard.json").is_file():
        return _load_found(p)
    cards = stored_cards(stores)
    match = [f for f in cards if f.name == ref] or [f for f in cards if f.card.ft.ref == ref]
    if len(match) != 1:
        if not match:
            check_stores_exist(stores)
        where = ", ".join(str(s) for s in stores) or "(no stores)"
        raise EtbenchError(f"{'no' if not match else len(match)} scorecard(s) for {ref!r} in {where}: "
                           "pass a scorecard.json path")
    return match[0]
