"""Every published number of a scorecard, re-derived from its per-item rows and circuits.

``etbench submit`` publishes a number only when the card's own rows re-derive it (docs/method.md, "A
published number is either re-derivable or absent"). Each estimate is recomputed with the function
scoring used (same seed, same number of resamples) and must match to 1e-9: accuracies and their Wilson
CIs, circuit and model accuracy on the faithfulness items, faithfulness (circuit correct / model correct)
and its bootstrap CI, the random-circuit baseline (mean, min and max over draws, from every draw's
per-item rows), head overlap of the two circuits, DCM test accuracies and the overlap of DCM selections
over seeds (from every seed's selections), CMAP patched accuracy, gain and normalised gain with their
paired-bootstrap CIs; the circuit-form ceilings of each model and each circuit's MIB-normalised
faithfulness, from the ceilings' per-item flags; the circuit-overlap CIs, from the discovery's per-prompt
scores; a sized circuit's record (the sizing prompts' model, form and no-heads accuracy, the form's
ceiling, the target, every curve point and the chosen sizes) from its per-prompt sizing rows.

The sections a protocol produces are required (both models at every box count, both ceilings, every
DCM seed's selections, random-circuit rows, sizing rows); a section listed twice is refused. A number
that nothing on the card re-derives may only be absent: null, and named in ``card.absent`` with the
reason (``ABSENTABLE``: the random-circuit baseline and the sizing record of a card converted from
schema 2, which kept neither's rows). What the items cannot recompute at all is checked for
consistency only: the semantics check lies inside its [min, max] over repeats. Non-finite numbers never
get this far (``scorecard.load`` refuses them).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Optional

from etbench.core.errors import EtbenchError
from etbench.core.stats import (
    Estimate,
    mib_ci,
    mib_normalised,
    paper_ratio,
    proportion_ci,
    ratio_of_sums_ci,
    to_estimate,
)
from etbench.metrics import edge_comparison as ec
from etbench.metrics.cmap_scores import cmap_score
from etbench.metrics.overlap import (
    circuit_overlap,
    dcm_overlap,
    dcm_seed_runs,
    equal_size_overlap,
    group_overlaps,
    item_scores_from_rows,
    selected_by_group,
)
from etbench.schema import scorecard as sc
from etbench.schema.circuit import Circuit
from etbench.schema.scorecard import check_items  # per-item rows are checked on every read
from etbench.scoring.assemble import random_circuit_estimate, semantics_estimate
from etbench.scoring.presets import SCORE_PRESETS

TOL = 1e-9
#: Resamples scoring uses for the CMAP gain CIs (``CmapResult.scores``) and the faithfulness CI.
N_RESAMPLES = 2000
#: Ceiling rows (``ablation``) -> the ``CeilingScore`` field they derive.
CEILING_FIELDS = {"every_head_every_position": "every_head_every_position", "form_all_heads": "form_accuracy",
                  "no_heads": "no_heads_accuracy"}
#: Numbers a card may leave out (null, named in ``card.absent``) because a card converted from schema 2 does not
#: carry the rows that re-derive them: the kind of field -> the reason. Anything else missing is refused.
ABSENTABLE = {
    "random circuit accuracy": "per-draw random-circuit rows were not kept before scorecard schema 3",
    "sizing": "per-prompt sizing rows were not kept before scorecard schema 3",
    "semantics check accuracy": "per-repeat semantics rows were not kept before scorecard schema 3",
}
#: Keys of a sized circuit's record (``CircuitSummary.sizing``): each is re-derived or a setting checked against
#: the preset; a record with any other key is refused (a number nothing checks).
SIZING_KEYS = {"chosen", "curve", "form_faithfulness", "mean_n", "model_accuracy", "n", "no_heads_accuracy", "note",
               "prompts", "reached", "strategy", "target_faithfulness", "target_fraction"}
CURVE_KEYS = {"accuracy", "added", "faithfulness", "mib", "scale", "size", "sizes"}


def random_circuit_where(circuit: str, model: str) -> str:
    return f"random circuit accuracy of the {circuit} circuit on {model}"


def sizing_where(circuit: str) -> str:
    return f"sizing of the {circuit} circuit"


def semantics_where(s: sc.SemanticsScore) -> str:
    return f"semantics check accuracy ({s.heads_of} heads into {s.model}, {s.group}, {s.desideratum})"


def _flags(items: list[dict[str, Any]], measure: str, **match: Any) -> list[bool]:
    rows = [r for r in items if all(r.get(k, "output" if k == "variant" else None) == v for k, v in match.items())]
    rows.sort(key=lambda r: r["item"])
    return [r["correct"] for r in rows]


def _close(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= TOL


def _differs(est: Estimate, want: Estimate) -> Optional[str]:
    for part in ("value", "low", "high", "level"):
        if not _close(getattr(est, part), getattr(want, part)):
            return f"{part} is {getattr(est, part)!r} but the items give {getattr(want, part)!r}"
    if est.n != want.n:
        return f"n is {est.n} but the items give {want.n}"
    if want.note and est.note != want.note:  # a note that states a number (an sd) states the derived one
        return f"note is {est.note!r} but the items give {want.note!r}"
    return None


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


class _Check:
    def __init__(self, items: list[dict[str, Any]], memo: Optional[dict] = None) -> None:
        self.items = items
        self.by_measure: dict[Any, list[dict[str, Any]]] = {}
        for r in items:
            self.by_measure.setdefault(r.get("measure"), []).append(r)
        self.memo = memo

    def derive(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept in ``memo`` under ``key`` (what it derives from): a caller checking many edits of
        one card against the same items (the fuzz test) recomputes only what an edit touched."""
        if self.memo is None:
            return compute()
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    @staticmethod
    def fail(what: str, why: str) -> None:
        raise EtbenchError(f"scorecard does not match its items file: {what}: {why} (edited, or not its items)")

    def expect(self, what: str, est: Estimate, want: Estimate) -> None:
        why = _differs(est, want)
        if why:
            self.fail(what, why)

    def rows(self, what: str, measure: str, n: Optional[int] = None, **match: Any) -> list[bool]:
        flags = _flags(self.by_measure.get(measure, []), measure, **match)
        if not flags:
            self.fail(what, "the items file has no rows for it")
        if n is not None:
            if len(flags) < n:
                self.fail(what, f"the items file has {len(flags)} rows for it, the scorecard says n = {n}")
            flags = flags[:n]
        return flags

    def within(self, what: str, est: Estimate) -> None:
        low = est.low if est.low is not None else est.value
        high = est.high if est.high is not None else est.value
        if est.value is not None and not (0 <= low <= est.value + TOL and est.value <= high + TOL and high <= 1):
            self.fail(what, f"{est.value} lies outside its range [{est.low}, {est.high}]")


def _mib(circuit: list[bool], model: list[bool], none: list[bool], seed: int) -> Estimate:
    """MIB-normalised faithfulness and its CI as scoring computes them (None where undefined)."""
    n = len(circuit)
    value = mib_normalised(sum(circuit) / n, sum(model) / n, sum(none) / n) if n else math.nan
    low, high = mib_ci(circuit, model, none, seed)
    if not math.isfinite(value):
        return Estimate(None, None, None, n, "")
    return Estimate(value, _finite_or_none(low), _finite_or_none(high), n, "")


def _discovery_scores(items: list[dict[str, Any]], model: str) -> dict:
    """``{group: {(layer, head): [score per prompt]}}`` of ``model``'s discovery_score rows."""
    rows: dict[tuple, dict[int, Any]] = {}
    for r in items:
        if r.get("measure") == "discovery_score" and r.get("model") == model:
            rows.setdefault((r.get("group"), r.get("layer"), r.get("head")), {})[r["item"]] = r.get("score")
    out = []
    for (group, layer, head), by_item in rows.items():
        if sorted(by_item) != list(range(len(by_item))):
            raise EtbenchError(f"items: discovery scores of {model} {group} L{layer}H{head} are not prompts 0..n-1")
        out.append([group, layer, head, [by_item[i] for i in range(len(by_item))]])
    try:
        return item_scores_from_rows(out)
    except (TypeError, ValueError, EtbenchError) as err:
        raise EtbenchError(f"items: malformed discovery score rows of {model} ({err})") from None


def _expect_overlap(check, what: str, rows, derived: dict, source: str) -> None:
    """Each stored overlap row equals the one derived for its group (base in ft and Jaccard)."""
    for o in rows:
        want = derived.get(o.group)
        if want is None:
            check.fail(f"{what} ({o.group})", f"no such group in {source}")
        check.expect(f"{what} ({o.group}), base in ft", o.base_in_ft, want.base_in_ft)
        check.expect(f"{what} ({o.group}), Jaccard", o.jaccard, want.jaccard)
        if (o.chance is None) != (want.chance is None) or o.chance is not None and not (
                o.chance.pool == want.chance.pool and o.chance.method == want.chance.method
                and all(_close(getattr(o.chance, k), getattr(want.chance, k)) for k in ("base_in_ft", "jaccard",
                                                                                         "p_value"))):
            check.fail(f"{what} ({o.group}), by chance", f"stored {o.chance}, derived {want.chance}")


def _pool(card: sc.Scorecard, rows) -> int | None:
    """The head pool of the chance levels: every head of the model, for cards that keep them."""
    return card.base.n_layers * card.base.n_heads if any(o.chance is not None for o in rows) else None


def _dcm_seeds(card: sc.Scorecard) -> list:
    preset = card.config.get("preset")
    return list(preset.get("dcm_seeds", [0])) if isinstance(preset, dict) else [0]


def _check_first_seed(check: _Check, card: sc.Scorecard, seeds: list) -> None:
    """The first DCM seed's selections are the DCM scores' selected heads (``dcm`` reports that seed)."""
    first = {(x.circuit, x.group, x.desideratum): sorted(map(tuple, x.selected_heads))
             for x in card.dcm_selections or () if seeds and x.seed == seeds[0]}
    scored = {(d.circuit, d.group, d.desideratum): sorted(map(tuple, d.selected_heads)) for d in card.dcm}
    for key in sorted(set(first) | set(scored)):
        if first.get(key) != scored.get(key):
            check.fail(f"DCM selections ({', '.join(key)}, seed {seeds[0]})",
                       f"the DCM scores select {scored.get(key)} but the seed's selections {first.get(key)}")


def _preset(card: sc.Scorecard) -> dict[str, Any]:
    preset = card.config.get("preset")
    return preset if isinstance(preset, dict) else {}


#: Each list section's identity (its entries' fields): two entries with the same key state one number twice.
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "accuracy": ("model", "n_boxes"),
    "circuits": ("name",),
    "faithfulness": ("circuit", "model"),
    "ceilings": ("model", "form"),
    "overlap": ("heads", "group"),
    "dcm": ("circuit", "group", "desideratum"),
    "cmap": ("variant", "group", "heads"),
    "semantics": ("heads_of", "model", "group", "desideratum"),
    "dcm_selections": ("circuit", "seed", "group", "desideratum"),
    "absent": ("where",),
}


def _check_unique(check: _Check, card: sc.Scorecard) -> None:
    for section, fields in SECTION_KEYS.items():
        seen = set()
        for entry in getattr(card, section) or ():
            k = tuple(getattr(entry, f) for f in fields)
            if k in seen:
                check.fail(f"{section} ({', '.join(map(str, k))})", "listed twice")
            seen.add(k)


def _absent_ok(check: _Check, card: sc.Scorecard, where: str, kind: str) -> bool:
    """True when ``where`` is declared absent (with ``kind``'s reason): its number must then be null."""
    declared = {a.where: a.reason for a in card.absent}
    if where not in declared:
        return False
    if declared[where] != ABSENTABLE[kind]:
        check.fail(where, f"declared absent for {declared[where]!r}; the only reason accepted is {ABSENTABLE[kind]!r}")
    return True


def _check_absent_list(check: _Check, card: sc.Scorecard, used: set[str]) -> None:
    for a in card.absent:
        if a.where not in used:
            check.fail(f"absent: {a.where}", "names no number this card leaves out (only a null random-circuit "
                                             "baseline, sizing record or semantics check can be absent)")


#: The note of a number left out (``leave_out_underivable``): an absent number states nothing else.
LEFT_OUT_NOTE = "not re-derivable: its rows were not kept (schema 2)"


def _null(est: Estimate) -> bool:
    return est.value is None and est.low is None and est.high is None


def _check_left_out(check: _Check, where: str, est: Estimate, n: Any, method: str) -> None:
    """An absent number is exactly ``leave_out_underivable``'s null: no value, interval or other note, and the
    protocol's n and method."""
    if est != Estimate(None, None, None, n, method, note=LEFT_OUT_NOTE):
        check.fail(where, f"declared absent, but the card states it ({est.value!r} [{est.low!r}, {est.high!r}], n "
                          f"{est.n!r}, level {est.level!r}, note {est.note!r})")


def _check_random_circuit(check: _Check, card: sc.Scorecard, f: sc.FaithfulnessScore, n: int, used: set[str]) -> None:
    """The random-circuit baseline from every draw's per-item rows (``random_circuit``, ``draw`` 0..D-1)."""
    where = random_circuit_where(f.circuit, f.model)
    draws = _preset(card).get("random_draws")
    rows = [r for r in check.by_measure.get("random_circuit", []) if r.get("model") == f.model
            and r.get("circuit") == f.circuit]
    if not rows:
        if _absent_ok(check, card, where, "random circuit accuracy"):
            used.add(where)
            _check_left_out(check, where, f.random_circuit_accuracy, draws, random_circuit_estimate([0.0]).method)
            return
        if draws == 0:
            check.expect(where, f.random_circuit_accuracy, random_circuit_estimate([]))
            return
        check.fail(where, "the items file has no random_circuit rows for it (required since scorecard schema 3: "
                          "score again with this etbench)")
    by_draw: dict[Any, dict[int, bool]] = {}
    for r in rows:
        by_draw.setdefault(r.get("draw"), {})[r["item"]] = r["correct"]
    if sorted(by_draw, key=repr) != list(range(len(by_draw))) or (draws is not None and len(by_draw) != draws):
        check.fail(where, f"draws {sorted(by_draw, key=repr)} in the items file; the protocol's are 0..{draws - 1}"
                   if draws else f"draws {sorted(by_draw, key=repr)} in the items file are not 0..D-1")
    accs = []
    for d in range(len(by_draw)):
        flags = by_draw[d]
        if sorted(flags) != list(range(n)):
            check.fail(where, f"draw {d} has rows for {len(flags)} items, not the faithfulness items 0..{n - 1}")
        accs.append(sum(flags.values()) / n)
    check.expect(where, f.random_circuit_accuracy, random_circuit_estimate(accs))


def _sizing_flags(check: _Check, where: str, name: str, n: int, **match: Any) -> list[bool]:
    rows = [r for r in check.by_measure.get("sizing", []) if r.get("circuit") == name
            and all(r.get(k) == v for k, v in match.items())]
    by_item = {r["item"]: r["correct"] for r in rows}
    if sorted(by_item) != list(range(n)) or len(rows) != n:
        what = ", ".join(f"{k} {v}" for k, v in match.items())
        check.fail(where, f"{len(rows)} sizing rows for {what}, not one per sizing prompt 0..{n - 1}")
    return [by_item[i] for i in range(n)]


def _same(a: Any, b: float) -> bool:
    """A stored float (null where scoring's value was not finite) equals a derived one."""
    if not math.isfinite(b):
        return a is None
    return isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a - b) <= TOL


def _check_sizing(check: _Check, card: sc.Scorecard, c: sc.CircuitSummary, used: set[str]) -> None:
    """A sized circuit's record from its per-prompt sizing rows (``sizing``: ``ablation`` model / form_all_heads /
    no_heads, or ``point`` k of the curve): every figure of the record, the target and the chosen sizes."""
    where = sizing_where(c.name)
    s = c.sizing
    if s is None:
        if _absent_ok(check, card, where, "sizing"):
            used.add(where)
            return
        check.fail(where, "the circuit was sized by faithfulness but the card has no sizing record")
    if not isinstance(s, dict) or set(s) - SIZING_KEYS or not isinstance(s.get("curve"), list):
        check.fail(where, f"unknown or missing fields ({sorted(set(s) - SIZING_KEYS) if isinstance(s, dict) else s})")
    if not any(r.get("circuit") == c.name for r in check.by_measure.get("sizing", [])):
        check.fail(where, "the items file has no sizing rows for it (required since scorecard schema 3: score again "
                          "with this etbench)")
    preset = _preset(card)
    n = s.get("n")
    if not sc._is_int(n) or n < 1 or n != preset.get("sizing_n", n):
        check.fail(f"{where}: n", f"{n!r} is not the protocol's sizing_n {preset.get('sizing_n')!r}")
    for key in ("mean_n", "target_fraction"):
        if s.get(key) != preset.get(key, s.get(key)):
            check.fail(f"{where}: {key}", f"{s.get(key)!r} is not the protocol's {preset.get(key)!r}")
    model, form, none = (_sizing_flags(check, where, c.name, n, ablation=a, point=None)
                         for a in ("model", "form_all_heads", "no_heads"))
    m, f, z = sum(model) / n, sum(form) / n, sum(none) / n
    form_faith = paper_ratio(f, m)
    target = s.get("target_fraction", math.nan) * form_faith if math.isfinite(form_faith) else math.nan
    for key, want in (("model_accuracy", m), ("no_heads_accuracy", z), ("form_faithfulness", form_faith),
                      ("target_faithfulness", target)):
        if not _same(s.get(key), want):
            check.fail(f"{where}: {key}", f"{s.get(key)!r} but the sizing rows give {want!r}")
    at_target = []
    for k, point in enumerate(s["curve"]):
        if not isinstance(point, dict) or set(point) != CURVE_KEYS or not isinstance(point.get("sizes"), dict):
            check.fail(f"{where}: curve point {k}", "not a curve point")
        acc = sum(_sizing_flags(check, where, c.name, n, ablation=None, point=k)) / n
        for key, want in (("accuracy", acc), ("faithfulness", paper_ratio(acc, m)), ("mib", mib_normalised(acc, m, z)),
                          ("size", float(sum(v for v in point["sizes"].values() if isinstance(v, int))))):
            if not _same(point.get(key), want):
                check.fail(f"{where}: curve point {k} {key}", f"{point.get(key)!r} but the sizing rows give {want!r}")
        if math.isfinite(target) and point["faithfulness"] is not None and point["faithfulness"] >= target:
            at_target.append(point)
    extra = [r for r in check.by_measure.get("sizing", []) if r.get("circuit") == c.name and r.get("point") is not None
             and not (sc._is_int(r.get("point")) and 0 <= r["point"] < len(s["curve"]))]
    if extra:
        check.fail(where, f"sizing rows for curve point {extra[0].get('point')!r}, which the curve does not have")
    if s.get("reached") is not bool(at_target):
        check.fail(f"{where}: reached", f"{s.get('reached')!r} but the curve {'reaches' if at_target else 'misses'} "
                                        "the target")
    if at_target and s.get("chosen") != min(at_target, key=lambda p: p["scale"])["sizes"]:
        check.fail(f"{where}: chosen", "not the sizes of the smallest circuit on the curve at the target")


def _check_semantics(check: _Check, card: sc.Scorecard, s: sc.SemanticsScore, used: set[str]) -> None:
    """The semantics check from its per-repeat rows (``semantics``, ``draw`` = the repeat); its heads are the DCM
    selection it patched (the ``heads_of`` circuit's at the first DCM seed)."""
    where = semantics_where(s)
    seeds = _dcm_seeds(card)
    selected = ([x for x in card.dcm_selections if x.seed == seeds[0]] if card.dcm_selections is not None and seeds
                else card.dcm)
    patched = next((x.selected_heads for x in selected if (x.circuit, x.group, x.desideratum)
                    == (s.heads_of, s.group, s.desideratum)), None)
    if patched is None or sorted(map(tuple, s.heads)) != sorted(map(tuple, patched)):
        check.fail(f"{where}: heads", f"{len(s.heads)} heads, not the {s.heads_of} circuit's DCM selection "
                                      f"({'none' if patched is None else len(patched)})")
    rows = [r for r in check.by_measure.get("semantics", []) if r.get("model") == s.model
            and r.get("heads") == s.heads_of and r.get("group") == s.group and r.get("desideratum") == s.desideratum]
    if not rows:
        if _absent_ok(check, card, where, "semantics check accuracy"):
            used.add(where)
            dcm = card.config.get("dcm") if isinstance(card.config.get("dcm"), dict) else {}
            want = semantics_estimate([0.0] * max(1, int(dcm.get("semantics_repeats") or 1)), dcm.get("semantics_n"))
            _check_left_out(check, where, s.accuracy, want.n, want.method)
            return
        check.fail(where, "the items file has no semantics rows for it (required since scorecard schema 3: score "
                          "again with this etbench)")
    by_repeat: dict[Any, list[bool]] = {}
    for r in sorted(rows, key=lambda r: r["item"]):
        by_repeat.setdefault(r.get("draw"), []).append(r["correct"])
    repeats = card.config.get("dcm", {}).get("semantics_repeats") if isinstance(card.config.get("dcm"), dict) else None
    if sorted(by_repeat, key=repr) != list(range(len(by_repeat))) or (repeats and len(by_repeat) != repeats):
        check.fail(where, f"repeats {sorted(by_repeat, key=repr)} in the items file; the protocol's are "
                          f"0..{(repeats or 0) - 1}")
    sizes = {len(v) for v in by_repeat.values()}
    if len(sizes) != 1:
        check.fail(where, f"repeats of different sizes {sorted(sizes)}")
    accs = [sum(by_repeat[k]) / len(by_repeat[k]) for k in range(len(by_repeat))]
    check.expect(where, s.accuracy, semantics_estimate(accs, sizes.pop()))


def _check_required(check: _Check, card: sc.Scorecard) -> None:
    """The sections the card's protocol produces are there."""
    preset = _preset(card)
    for model in ("base", "ft"):
        for k in preset.get("accuracy_boxes", ()):
            if not any(a.model == model and a.n_boxes == k for a in card.accuracy):
                check.fail(f"accuracy of {model} at {k} boxes", "missing (the protocol measures it)")
    for model in sorted({f.model for f in card.faithfulness}):
        if not any(c.model == model for c in card.ceilings):
            check.fail(f"ceilings of {model}", "missing (the protocol measures them beside every faithfulness row)")
    names = {c.name for c in card.circuits}
    for name in sorted(names & {"base", "ft"}):
        for model in ("base", "ft"):
            if not any(f.circuit == name and f.model == model for f in card.faithfulness):
                check.fail(f"faithfulness of the {name} circuit on {model}", "missing (the protocol measures it)")
    seeds = _dcm_seeds(card)
    if card.dcm_selections is None and len(seeds) > 1 and (card.dcm or any(o.heads == "dcm" for o in card.overlap)):
        check.fail("dcm_selections", f"missing: the DCM head overlap over {len(seeds)} seeds is re-derived from every "
                                     "seed's selections")
    # the head overlap of the two circuits, as found and at equal size (mechanism reuse, a headline score), per group
    # the circuits give: deleting a row would leave its headline blank as if undefined
    circuits = {c.name: c.heads for c in card.circuits}
    if "base" in circuits and "ft" in circuits:
        pool = card.base.n_layers * card.base.n_heads
        for heads, groups in (("circuit", set(group_overlaps(circuits["base"], circuits["ft"]))),
                              ("circuit-top", {o.group for o in equal_size_overlap(circuits["base"], circuits["ft"],
                                                                                   pool)})):
            for g in sorted(groups - {o.group for o in card.overlap if o.heads == heads}):
                check.fail(f"{'equal-size ' if heads == 'circuit-top' else ''}head overlap ({g})",
                           "missing (the circuits on the card give it)")
    # every CMAP number whose per-item rows the card carries (gain explained, a headline score, is the full row's)
    stated = {(c.variant, c.group, c.heads) for c in card.cmap}
    for r in check.by_measure.get("cmap", []):
        key = (r.get("variant", "output"), r.get("group"), r.get("heads", "dcm"))
        if key[0] != "none" and key not in stated:
            check.fail(f"CMAP {key[0]} {key[1]} ({key[2]} heads)", "missing (the items file carries its rows)")
    if {"base", "ft"} <= {d.circuit for d in card.dcm} and not any(o.heads == "dcm" for o in card.overlap):
        check.fail("DCM head overlap", "missing (the card's DCM selections of both circuits give it)")
    # the semantics check runs on both models for every (group, desideratum) of the base circuit's first-seed DCM
    # selection (scoring's semantics stage, recorded in the config's DCM settings): an entry deleted with its absent
    # line would hide a failed check
    dcm_cfg = card.config.get("dcm") if isinstance(card.config.get("dcm"), dict) else {}
    first = ([] if not dcm_cfg.get("semantics_repeats") else card.dcm if card.dcm_selections is None
             else [x for x in card.dcm_selections if seeds and x.seed == seeds[0]])
    for key in sorted({(x.group, x.desideratum) for x in first if x.circuit == "base"}):
        for model in ("base", "ft"):
            if not any((s.heads_of, s.model, s.group, s.desideratum) == ("base", model, *key) for s in card.semantics):
                check.fail(f"semantics check (base heads into {model}, {key[0]}, {key[1]})",
                           "missing (the protocol runs it on both models for every DCM selection of the base circuit)")
    if card.dcm_selections is not None:
        for d in card.dcm:
            for seed in seeds:
                if not any(x.circuit == d.circuit and x.seed == seed and x.group == d.group
                           and x.desideratum == d.desideratum for x in card.dcm_selections):
                    check.fail(f"DCM selections ({d.circuit}, {d.group}, {d.desideratum}, seed {seed})",
                               "missing (the protocol runs DCM at every seed)")


EDGES_WHERE = "edges"


def _check_edges(check: _Check, card: sc.Scorecard) -> None:
    """The ``edges`` section from its ``edge_effect`` rows (schema 4): the node set is the circuits' top
    ``node_k`` heads, the rows cover exactly the reachable edges between it, on prompts 0..n-1, for both models,
    under the settings of the card's preset (the current definition); every row of the comparison (k, common
    edges, overlap, rewiring, chance level, base edges' share and their CIs) is ``compare_edges`` of those rows.
    A preset that scores edges requires the section (a card scored before it existed, schema 3, has none)."""
    e, rows = card.edges, check.by_measure.get(ec.EDGE_MEASURE, [])
    if e is None:
        if rows:
            check.fail(EDGES_WHERE, "missing (the items file carries edge_effect rows)")
        if card.schema_version >= 4 and _preset(card).get("edge_types"):
            check.fail(EDGES_WHERE, "missing (the card's preset scores edges)")
        # a card scored under schema 4 records its preset's edge_types (empty where it scores none); one whose
        # record predates them is schema 4 only by `submit --add-edges`, which adds the section: without
        # either, the version was edited
        if card.schema_version >= 4 and "edge_types" not in _preset(card):
            check.fail(EDGES_WHERE, "missing (a schema-4 card without edges records its preset's edge_types; "
                                    "this one's preset predates them: its schema_version was edited)")
        return
    if card.schema_version < 4:
        check.fail(EDGES_WHERE, f"an edges section on a card of schema {card.schema_version} (edges are schema 4)")
    preset = SCORE_PRESETS.get(_preset(card).get("name"))
    want = {"types": list(preset.edge_types) if preset else None, "n": preset.edge_n if preset else None,
            "seed": card.config.get("seed", 0), "n_boxes": ec.EDGE_BOXES, "batch_size": ec.EDGE_BATCH_SIZE,
            "top_fraction": ec.DEFAULT_TOP_FRACTION, "n_resamples": ec.RESAMPLES}
    for key, value in want.items():
        if getattr(e, key) != value:
            check.fail(f"{EDGES_WHERE} {key}", f"is {getattr(e, key)!r}; the card's preset scores edges with {value!r}")
    if e.kv_group_size < 1 or card.base.n_heads % e.kv_group_size:
        check.fail(f"{EDGES_WHERE} kv_group_size", f"{e.kv_group_size} does not divide the {card.base.n_heads} heads")
    circuits = {c.name: c.heads for c in card.circuits}
    if not {"base", "ft"} <= set(circuits):
        check.fail(EDGES_WHERE, "the scorecard lists no base and ft circuits to take the node set from")
    shape = {"n_layers": card.base.n_layers, "n_heads": card.base.n_heads}
    try:
        nodes = ec.nodes_of(Circuit.from_heads(circuits["base"], **shape), Circuit.from_heads(circuits["ft"], **shape),
                            e.node_k)
    except EtbenchError as err:
        check.fail(f"{EDGES_WHERE} nodes", str(err))
    stated = {g: [tuple(h) for h in hs] for g, hs in e.nodes.items() if hs}
    if stated != {g: hs for g, hs in nodes.items() if hs}:
        check.fail(f"{EDGES_WHERE} nodes", "are not the circuits' top node_k heads per group")
    reachable = ec.reachable_edges(nodes, e.types, e.kv_group_size)
    scores = {}
    for w in ("base", "ft"):
        try:
            scores[w] = ec.scores_from_rows(rows, w, e.nodes, e.n, ec.section_parameters(e))
        except EtbenchError as err:
            check.fail(f"{EDGES_WHERE} of {w}", str(err))
        keys = [x.key for x in scores[w].edges]
        if keys != reachable:
            check.fail(f"{EDGES_WHERE} of {w}", f"the items file has edge_effect rows for {len(keys)} edges; the node "
                                                f"set reaches {len(reachable)}")
    derived = check.derive(("edges", repr((e.nodes, e.node_k, e.n, e.types, e.kv_group_size, rows)),
                            card.config.get("seed", 0)),
                           lambda: ec.section_of(scores["base"], scores["ft"], e.node_k, card.config.get("seed", 0)))
    if [r.type for r in e.rows] != [r.type for r in derived.rows]:
        check.fail(f"{EDGES_WHERE} rows", f"are {[r.type for r in e.rows]}; the rows give {[r.type for r in derived.rows]}")
    for r, d in zip(e.rows, derived.rows):
        what = f"{EDGES_WHERE} ({r.type})"
        for key in ("n_candidates", "k", "n_common"):
            if getattr(r, key) != getattr(d, key):
                check.fail(f"{what} {key}", f"is {getattr(r, key)!r} but the items give {getattr(d, key)!r}")
        for key in ("overlap", "rewiring", "base_edges_share"):
            check.expect(f"{what} {key.replace('_', ' ')}", getattr(r, key), getattr(d, key))
        if (r.chance is None) != (d.chance is None) or r.chance is not None and not (
                r.chance.pool == d.chance.pool and r.chance.method == d.chance.method
                and all(_close(getattr(r.chance, k), getattr(d.chance, k)) for k in ("base_in_ft", "jaccard", "p_value"))):
            check.fail(f"{what} by chance", f"stored {r.chance}, derived {d.chance}")


def rederive(card: sc.Scorecard, items: list[dict[str, Any]], memo: Optional[dict] = None) -> list[str]:
    """Raise ``EtbenchError`` naming the first number that its items do not reproduce, or a section the protocol
    produces that is missing or listed twice. Returns notes (the numbers the card declares absent).
    ``memo``: a dict kept across calls on the same items (see ``_Check.derive``)."""
    check_items(items)
    seed = card.config.get("seed", 0)
    check = _Check(items, memo)
    notes: list[str] = []
    used: set[str] = set()
    _check_unique(check, card)
    _check_required(check, card)
    for a in card.accuracy:
        what = f"accuracy of {a.model} at {a.n_boxes} boxes"
        flags = check.rows(what, "accuracy", model=a.model, n_boxes=a.n_boxes)
        check.expect(what, a.accuracy, to_estimate(proportion_ci(sum(flags), len(flags))))
    for f in card.faithfulness:
        what = f"faithfulness of the {f.circuit} circuit on {f.model}"
        circ_what = f"circuit accuracy of the {f.circuit} circuit on {f.model}"
        circ = check.rows(circ_what, "circuit_accuracy", model=f.model, circuit=f.circuit)
        n = len(circ)
        # the faithfulness items are the first n of the 7-box accuracy items (same seeded stream)
        model_what = f"model accuracy of {f.model} in the {what}"
        full = check.rows(model_what, "accuracy", n=n, model=f.model, n_boxes=7)
        check.expect(circ_what, f.circuit_accuracy, to_estimate(proportion_ci(sum(circ), n)))
        check.expect(model_what, f.model_accuracy, to_estimate(proportion_ci(sum(full), n)))
        low, high = check.derive(("ratio", tuple(circ), tuple(full), seed),
                                 lambda: ratio_of_sums_ci(circ, full, seed=seed, draws=N_RESAMPLES))
        value = sum(circ) / sum(full) if sum(full) else None
        check.expect(what, f.faithfulness, Estimate(value, _finite_or_none(low), _finite_or_none(high), n, ""))
        if f.faithfulness_mib is not None:
            mib_what = f"MIB faithfulness of the {f.circuit} circuit on {f.model}"
            none = check.rows(f"no-heads ceiling of {f.model} in the {mib_what}", "ceiling", n=n, model=f.model,
                              ablation="no_heads")
            check.expect(mib_what, f.faithfulness_mib,
                         check.derive(("mib", tuple(circ), tuple(full), tuple(none), seed),
                                      lambda: _mib(circ, full, none, seed)))
        _check_random_circuit(check, card, f, n, used)
    for c in card.ceilings:
        what = f"ceiling of the {c.form} form on {c.model}"
        n = c.model_accuracy.n
        model = check.rows(f"model accuracy in the {what}", "accuracy", n=n, model=c.model, n_boxes=7)
        check.expect(f"model accuracy in the {what}", c.model_accuracy, to_estimate(proportion_ci(sum(model), n)))
        flags = {}
        for ablation, name in CEILING_FIELDS.items():
            flags[ablation] = check.rows(f"{name} in the {what}", "ceiling", model=c.model, ablation=ablation)
            check.expect(f"{name} in the {what}", getattr(c, name),
                         to_estimate(proportion_ci(sum(flags[ablation]), len(flags[ablation]))))
        form, none = flags["form_all_heads"], flags["no_heads"]
        if not len(form) == len(none) == n:
            check.fail(what, f"{len(form)} form rows and {len(none)} no-heads rows for n = {n}")
        low, high = check.derive(("ratio", tuple(form), tuple(model), seed),
                                 lambda: ratio_of_sums_ci(form, model, seed=seed, draws=N_RESAMPLES))
        value = sum(form) / sum(model) if sum(model) else None
        check.expect(f"form faithfulness in the {what}", c.form_faithfulness,
                     Estimate(value, _finite_or_none(low), _finite_or_none(high), n, ""))
        check.expect(f"form MIB faithfulness in the {what}", c.form_faithfulness_mib,
                     check.derive(("mib", tuple(form), tuple(model), tuple(none), seed),
                                  lambda: _mib(form, model, none, seed)))
    for c in card.circuits:
        if c.size_rule == "faithfulness" and c.method != "given":
            _check_sizing(check, card, c, used)
        elif c.sizing is not None:
            check.fail(sizing_where(c.name), f"a sizing record on a circuit sized by {c.size_rule!r}")
    circuits = {c.name: c.heads for c in card.circuits}
    circuit_rows = [o for o in card.overlap if o.heads == "circuit"]
    if circuit_rows:
        if "base" not in circuits or "ft" not in circuits:
            check.fail("circuit head overlap", "the scorecard lists no base and ft circuits to derive it from")
        pool = _pool(card, circuit_rows)

        def overlap_of_circuits():
            scores = {w: _discovery_scores(items, w) for w in ("base", "ft")}
            return {o.group: o for o in circuit_overlap(circuits["base"], circuits["ft"],
                                                        item_scores=(scores["base"], scores["ft"]), seed=seed,
                                                        pool=pool)}

        derived = check.derive(("circuit_overlap", repr(circuits.get("base")), repr(circuits.get("ft")), pool, seed),
                               overlap_of_circuits)
        _expect_overlap(check, "circuit head overlap", circuit_rows, derived, "the circuits")
    top_rows = [o for o in card.overlap if o.heads == "circuit-top"]
    if top_rows:
        if "base" not in circuits or "ft" not in circuits:
            check.fail("equal-size head overlap", "the scorecard lists no base and ft circuits to derive it from")
        derived = {o.group: o for o in equal_size_overlap(circuits["base"], circuits["ft"],
                                                          card.base.n_layers * card.base.n_heads)}
        _expect_overlap(check, "equal-size head overlap", top_rows, derived, "the circuits")
    for d in card.dcm:
        what = f"DCM test accuracy ({d.circuit} circuit, {d.group}, {d.desideratum})"
        flags = check.rows(what, "dcm_test", circuit=d.circuit, group=d.group, desideratum=d.desideratum)
        check.expect(what, d.test_accuracy, to_estimate(proportion_ci(sum(flags), len(flags))))
    dcm_rows = [o for o in card.overlap if o.heads == "dcm"]
    seeds = _dcm_seeds(card)
    if card.dcm_selections is not None:
        _check_first_seed(check, card, seeds)
    if dcm_rows and card.dcm_selections is not None:  # every seed's selections, as scoring computed the overlap
        try:
            runs = dcm_seed_runs(card.dcm_selections, seeds)
        except EtbenchError as err:
            check.fail("DCM head overlap", f"its DCM selections: {err}")
    elif dcm_rows:  # one seed (more are refused above): its selections are the DCM scores'
        chosen = {w: selected_by_group({(d.group, d.desideratum): tuple(tuple(h) for h in d.selected_heads)
                                        for d in card.dcm if d.circuit == w}) for w in ("base", "ft")}
        runs = ([chosen["base"]], [chosen["ft"]])
    if dcm_rows:
        derived = check.derive(("dcm_overlap", repr(runs), seed), lambda: {o.group: o for o in dcm_overlap(*runs,
                                                                                                             seed=seed)})
        _expect_overlap(check, "DCM head overlap", dcm_rows, derived, "the DCM selections")
    if card.cmap:
        base = [float(x) for x in check.rows("CMAP unpatched base accuracy", "cmap", model="base", variant="none",
                                             group="none")]
        ft = [float(x) for x in check.rows("CMAP unpatched fine-tuned accuracy", "cmap", model="ft", variant="none",
                                           group="none")]
        # CMAP rows are labelled by head set ("dcm", "circuit") since schema 2; older rows carry no label
        labelled = any("heads" in r for r in check.by_measure.get("cmap", []))
        for c in card.cmap:
            what = f"CMAP {c.variant} {c.group}" + (f" ({c.heads} heads)" if labelled else "")
            patched = check.rows(f"{what} patched accuracy", "cmap", model="base", variant=c.variant, group=c.group,
                                 **({"heads": c.heads} if labelled else {}))
            if len(patched) != len(base) or len(ft) != len(base):
                check.fail(what, f"{len(patched)} patched rows, {len(base)} base and {len(ft)} fine-tuned rows")
            want = check.derive(("cmap", c.variant, c.group, tuple(base), tuple(ft), tuple(patched), seed),
                                lambda: cmap_score(c.variant, c.group, base, ft, patched, seed=seed,
                                                   n_resamples=N_RESAMPLES))
            check.expect(f"{what} patched accuracy", c.patched_accuracy, want.patched_accuracy)
            check.expect(f"{what} gain", c.gain, want.gain)
            check.expect(f"{what} normalised gain", c.normalised_gain, want.normalised_gain)
    for s in card.semantics:
        _check_semantics(check, card, s, used)
    _check_edges(check, card)
    _check_absent_list(check, card, used)
    by_reason: dict[str, int] = {}
    for a in card.absent:
        by_reason[a.reason] = by_reason.get(a.reason, 0) + 1
    notes += [f"left out {k} number(s) that nothing on the card re-derives: {reason}" for reason, k in by_reason.items()]
    return notes


def leave_out_underivable(card: sc.Scorecard, items: list[dict[str, Any]]) -> sc.Scorecard:
    """``card`` as schema 3: every random-circuit baseline, sizing record and semantics check that its items
    cannot re-derive (a card written before schema 3 kept none of their rows) becomes null and is listed in
    ``absent`` with the reason; every other number is kept as it is (``rederive`` then checks it)."""
    measures = {(r.get("measure"), r.get("model"), r.get("circuit"), r.get("heads"), r.get("group"),
                 r.get("desideratum")) for r in items if r.get("measure") in ("random_circuit", "sizing", "semantics")}
    absent = list(card.absent)
    faithfulness = []
    for f in card.faithfulness:
        if ("random_circuit", f.model, f.circuit, None, None, None) not in measures and not _null(
                f.random_circuit_accuracy):
            absent.append(sc.AbsentNumber(random_circuit_where(f.circuit, f.model), ABSENTABLE["random circuit accuracy"]))
            f = replace(f, random_circuit_accuracy=_left_out(f.random_circuit_accuracy))
        faithfulness.append(f)
    circuits = []
    for c in card.circuits:
        if c.sizing is not None and not any(m[0] == "sizing" and m[2] == c.name for m in measures):
            absent.append(sc.AbsentNumber(sizing_where(c.name), ABSENTABLE["sizing"]))
            c = replace(c, sizing=None)
        circuits.append(c)
    semantics = []
    for s in card.semantics:
        if ("semantics", s.model, None, s.heads_of, s.group, s.desideratum) not in measures:
            absent.append(sc.AbsentNumber(semantics_where(s), ABSENTABLE["semantics check accuracy"]))
            s = replace(s, accuracy=_left_out(s.accuracy))
        semantics.append(s)
    return replace(card, faithfulness=faithfulness, circuits=circuits, semantics=semantics, absent=absent,
                   schema_version=sc.SCHEMA_VERSION)


def _left_out(est: Estimate) -> Estimate:
    return Estimate(None, None, None, est.n, est.method, note=LEFT_OUT_NOTE)
