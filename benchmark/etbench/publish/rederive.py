"""Every published number of a scorecard, re-derived from its per-item rows and circuits.

``etbench submit`` trusts nothing a scorecard states that its items can recompute. Each estimate is
recomputed with the function scoring used (same seed, same number of resamples) and must match to
1e-9: accuracies and their Wilson CIs, circuit and model accuracy on the faithfulness items,
faithfulness (circuit correct / model correct) and its bootstrap CI, head overlap of the two circuits,
DCM test accuracies and the overlap of DCM selections over seeds (from every seed's selections; a card
written before they were kept: one seed only, several range-checked), CMAP patched accuracy, gain and
normalised gain with their paired-bootstrap CIs; the circuit-form ceilings of each model (model,
every-head, form and no-heads accuracy, the form's faithfulness in both normalisations with their CIs)
and each circuit's MIB-normalised faithfulness, from the ceilings' per-item flags; the circuit-overlap
CIs, from the discovery's per-prompt scores. An estimate without item rows is refused. What the
items cannot recompute is checked for consistency: the random-circuit baseline and the semantics
check lie inside their [min, max] over draws or repeats. Non-finite numbers never get this far
(``scorecard.load`` refuses them).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from etbench.core.errors import EtbenchError
from etbench.core.stats import (
    Estimate,
    mib_ci,
    mib_normalised,
    proportion_ci,
    ratio_of_sums_ci,
    to_estimate,
)
from etbench.metrics.cmap_scores import cmap_score
from etbench.metrics.overlap import (
    circuit_overlap,
    dcm_overlap,
    dcm_seed_runs,
    equal_size_overlap,
    item_scores_from_rows,
    selected_by_group,
)
from etbench.schema import scorecard as sc
from etbench.schema.scorecard import check_items  # per-item rows are checked on every read

TOL = 1e-9
#: Resamples scoring uses for the CMAP gain CIs (``CmapResult.scores``) and the faithfulness CI.
N_RESAMPLES = 2000
#: Ceiling rows (``ablation``) -> the ``CeilingScore`` field they derive.
CEILING_FIELDS = {"every_head_every_position": "every_head_every_position", "form_all_heads": "form_accuracy",
                  "no_heads": "no_heads_accuracy"}


def _flags(items: list[dict[str, Any]], measure: str, **match: Any) -> list[bool]:
    rows = [r for r in items if r.get("measure") == measure
            and all(r.get(k, "output" if k == "variant" else None) == v for k, v in match.items())]
    rows.sort(key=lambda r: r["item"])
    return [r["correct"] for r in rows]


def _close(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= TOL


def _differs(est: Estimate, want: Estimate) -> Optional[str]:
    for part in ("value", "low", "high"):
        if not _close(getattr(est, part), getattr(want, part)):
            return f"{part} is {getattr(est, part)!r} but the items give {getattr(want, part)!r}"
    if est.n != want.n:
        return f"n is {est.n} but the items give {want.n}"
    return None


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


class _Check:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    @staticmethod
    def fail(what: str, why: str) -> None:
        raise EtbenchError(f"scorecard does not match its items file: {what}: {why} (edited, or not its items)")

    def expect(self, what: str, est: Estimate, want: Estimate) -> None:
        why = _differs(est, want)
        if why:
            self.fail(what, why)

    def rows(self, what: str, measure: str, n: Optional[int] = None, **match: Any) -> list[bool]:
        flags = _flags(self.items, measure, **match)
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


def rederive(card: sc.Scorecard, items: list[dict[str, Any]]) -> list[str]:
    """Raise ``EtbenchError`` naming the first number that its items do not reproduce. Returns notes
    about what could only be checked for consistency."""
    check_items(items)
    seed = card.config.get("seed", 0)
    check = _Check(items)
    notes = []
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
        low, high = ratio_of_sums_ci(circ, full, seed=seed, draws=N_RESAMPLES)
        value = sum(circ) / sum(full) if sum(full) else None
        check.expect(what, f.faithfulness, Estimate(value, _finite_or_none(low), _finite_or_none(high), n, ""))
        if f.faithfulness_mib is not None:
            mib_what = f"MIB faithfulness of the {f.circuit} circuit on {f.model}"
            none = check.rows(f"no-heads ceiling of {f.model} in the {mib_what}", "ceiling", n=n, model=f.model,
                              ablation="no_heads")
            check.expect(mib_what, f.faithfulness_mib, _mib(circ, full, none, seed))
        check.within(f"random circuit accuracy in the {what}", f.random_circuit_accuracy)
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
        low, high = ratio_of_sums_ci(form, model, seed=seed, draws=N_RESAMPLES)
        value = sum(form) / sum(model) if sum(model) else None
        check.expect(f"form faithfulness in the {what}", c.form_faithfulness,
                     Estimate(value, _finite_or_none(low), _finite_or_none(high), n, ""))
        check.expect(f"form MIB faithfulness in the {what}", c.form_faithfulness_mib, _mib(form, model, none, seed))
    circuits = {c.name: c.heads for c in card.circuits}
    circuit_rows = [o for o in card.overlap if o.heads == "circuit"]
    if circuit_rows:
        if "base" not in circuits or "ft" not in circuits:
            check.fail("circuit head overlap", "the scorecard lists no base and ft circuits to derive it from")
        scores = {w: _discovery_scores(items, w) for w in ("base", "ft")}
        derived = {o.group: o for o in circuit_overlap(circuits["base"], circuits["ft"],
                                                       item_scores=(scores["base"], scores["ft"]), seed=seed,
                                                       pool=_pool(card, circuit_rows))}
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
    if dcm_rows and (card.dcm_selections is not None or len(seeds) == 1):
        if card.dcm_selections is not None:  # every seed's selections, as scoring computed the overlap from them
            try:
                runs = dcm_seed_runs(card.dcm_selections, seeds)
            except EtbenchError as err:
                check.fail("DCM head overlap", f"its DCM selections: {err}")
        else:  # a card written before they were kept: one seed, whose selections are the DCM scores'
            chosen = {w: selected_by_group({(d.group, d.desideratum): tuple(tuple(h) for h in d.selected_heads)
                                            for d in card.dcm if d.circuit == w}) for w in ("base", "ft")}
            runs = ([chosen["base"]], [chosen["ft"]])
        derived = {o.group: o for o in dcm_overlap(*runs, seed=seed)}
        _expect_overlap(check, "DCM head overlap", dcm_rows, derived, "the DCM selections")
    elif dcm_rows:
        notes.append(f"DCM head overlap over {len(seeds)} seeds is not re-derivable from the scorecard (written "
                     "before every seed's DCM selections were kept: it has the first seed's): checked for range only")
        for o in dcm_rows:
            check.within(f"DCM head overlap ({o.group}), base in ft", o.base_in_ft)
            check.within(f"DCM head overlap ({o.group}), Jaccard", o.jaccard)
    if card.cmap:
        base = [float(x) for x in check.rows("CMAP unpatched base accuracy", "cmap", model="base", variant="none",
                                             group="none")]
        ft = [float(x) for x in check.rows("CMAP unpatched fine-tuned accuracy", "cmap", model="ft", variant="none",
                                           group="none")]
        # CMAP rows are labelled by head set ("dcm", "circuit") since schema 2; older rows carry no label
        labelled = any("heads" in r for r in items if r.get("measure") == "cmap")
        for c in card.cmap:
            what = f"CMAP {c.variant} {c.group}" + (f" ({c.heads} heads)" if labelled else "")
            patched = check.rows(f"{what} patched accuracy", "cmap", model="base", variant=c.variant, group=c.group,
                                 **({"heads": c.heads} if labelled else {}))
            if len(patched) != len(base) or len(ft) != len(base):
                check.fail(what, f"{len(patched)} patched rows, {len(base)} base and {len(ft)} fine-tuned rows")
            want = cmap_score(c.variant, c.group, base, ft, patched, seed=seed, n_resamples=N_RESAMPLES)
            check.expect(f"{what} patched accuracy", c.patched_accuracy, want.patched_accuracy)
            check.expect(f"{what} gain", c.gain, want.gain)
            check.expect(f"{what} normalised gain", c.normalised_gain, want.normalised_gain)
    for s in card.semantics:
        check.within(f"semantics check accuracy ({s.heads_of} heads into {s.model}, {s.group}, {s.desideratum})",
                     s.accuracy)
    return notes
