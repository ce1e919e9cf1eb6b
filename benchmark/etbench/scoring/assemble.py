"""Stage results -> a typed ``Scorecard`` and its per-item rows (pure: no model is run here)."""

from __future__ import annotations

import platform
import statistics
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from etbench import __version__
from etbench.core.io import finite
from etbench.metrics.cmap_scores import scores_from_rows
from etbench.metrics.edge_comparison import EdgeScores, edge_rows, section_of
from etbench.metrics.overlap import (
    circuit_overlap,
    dcm_overlap,
    dcm_seed_runs,
    equal_size_overlap,
    item_scores_from_rows,
)
from etbench.schema import scorecard as sc
from etbench.schema.circuit import Circuit


def library_versions() -> dict[str, str]:
    """Versions of the libraries a scorecard's numbers depend on (recorded in its provenance)."""
    out = {}
    for dist in ("torch", "transformers", "peft", "lm-eval", "numpy", "scipy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    out["python"] = platform.python_version()
    return out


def model_card(loaded, spec, identity: dict[str, Any]) -> sc.ModelCard:
    """What was scored: the published reference, source and weights revision (``identity``: no local
    paths), and the architecture and head layout of the loaded model."""
    return sc.ModelCard(ref=identity["ref"], source=identity["source"],
                        architecture=getattr(loaded.model.config, "model_type", "?"),
                        n_layers=spec.n_layers, n_heads=spec.n_heads, revision=identity["revision"])


def _faithfulness_score(ev: dict[str, Any], circuit: str, model: str) -> sc.FaithfulnessScore:
    def prop(d) -> sc.Estimate:
        return sc.Estimate(d["value"], d["ci95"][0], d["ci95"][1], d["n"], d["method"])

    low, high = ev["faithfulness_ci"]
    random_est = random_circuit_estimate((ev.get("baseline") or {}).get("accuracies") or [])
    mib = None
    if "mib" in ev:
        mib = _mib_estimate(ev["mib"], *ev["mib_ci"], ev["n"])
    return sc.FaithfulnessScore(
        circuit=circuit, model=model, model_accuracy=prop(ev["model_acc"]), circuit_accuracy=prop(ev["circuit_acc"]),
        faithfulness=sc.Estimate(ev["faithfulness"], low, high, ev["n"], "paired-bootstrap ratio"),
        random_circuit_accuracy=random_est, faithfulness_mib=mib)


def _ceiling_score(model: str, c: dict[str, Any]) -> sc.CeilingScore:
    def prop(d) -> sc.Estimate:
        return sc.Estimate(d["value"], d["ci95"][0], d["ci95"][1], d["n"], "wilson")

    return sc.CeilingScore(
        model=model, form=c["form"], model_accuracy=prop(c["model"]),
        every_head_every_position=prop(c["every_head_every_position"]), form_accuracy=prop(c["form_all_heads"]),
        no_heads_accuracy=prop(c["no_heads"]),
        form_faithfulness=_ratio_estimate(c["form_faithfulness"], *c["form_faithfulness_ci"], c["n"],
                                          "paired-bootstrap ratio", "undefined: the model's accuracy is 0"),
        form_faithfulness_mib=_mib_estimate(c["form_mib"], *c["form_mib_ci"], c["n"]))


def _mib_estimate(value, low, high, n: int) -> sc.Estimate:
    return _ratio_estimate(value, low, high, n, "paired-bootstrap (m(C)-m(none))/(m(N)-m(none))",
                           "undefined: the model is no better than no heads")


def _ratio_estimate(value, low, high, n: int, method: str, why_undefined: str) -> sc.Estimate:
    """A ratio is undefined (NaN) when its denominator is 0: stored as None with the reason (JSON has no NaN)."""
    value, low, high = finite(value), finite(low), finite(high)
    if value is None:
        return sc.Estimate(None, None, None, n, method, note=why_undefined)
    return sc.Estimate(value, low, high, n, method)


def random_circuit_estimate(accuracies: list[float]) -> sc.Estimate:
    """The random-circuit baseline as a scorecard states it: the mean over draws, low/high their min/max, n the
    draws (scoring, and submit's re-derivation from the per-draw rows)."""
    if not accuracies:
        return sc.Estimate(None, None, None, 0, "random circuits, same group sizes")
    mean = sum(accuracies) / len(accuracies)
    sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return sc.Estimate(mean, min(accuracies), max(accuracies), len(accuracies), "random circuits, same group sizes",
                       note=f"low/high = min/max over draws; sd {sd:.3f}")


def semantics_estimate(accuracies: list[float], n: int) -> sc.Estimate:
    """The semantics check as a scorecard states it: the mean over repeats, low/high their min/max, n the pairs
    per repeat (scoring, and submit's re-derivation from the per-repeat rows)."""
    sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return sc.Estimate(statistics.fmean(accuracies), min(accuracies), max(accuracies), n,
                       f"mean over {len(accuracies)} repeats with fresh sources",
                       note=f"low/high = min/max over repeats; sd {sd:.3f}")


def _semantics_score(model: str, r: dict[str, Any]) -> sc.SemanticsScore:
    return sc.SemanticsScore("base", model, r["group"], r["desideratum"], r["heads"],
                             semantics_estimate(r["accuracies"], r["n"]))


def assemble_scorecard(config, chash, cards, acc, circuits, faith, dcm_runs, cmap, semantics, seed, dtype, device,
                       dcm_seeds, edges=None):
    """``dcm_runs``: per side, one DCM stage result per entry of ``dcm_seeds``, in that order. ``edges``: per side,
    the edges stage's result (None: the preset scores no edges)."""
    section, edge_items = edges_section(edges, seed) if edges is not None else (None, [])
    accuracy = []
    for which in ("base", "ft"):
        for s in acc[which]["summaries"]:
            accuracy.append(sc.AccuracyScore(which, s["n_boxes"], sc.Estimate(
                s["accuracy"], s["ci95"][0], s["ci95"][1], s["n"], s["ci_method"])))
    circ = {w: Circuit.from_dict(circuits[w]["circuit"]) for w in ("base", "ft")}
    summaries = [sc.CircuitSummary(name=w, found_on=config[w] if circuits[w]["method"] != "given" else "given",
                                   method=circuits[w]["method"],
                                   heads={g: [list(h) for h in circ[w].heads(g)] for g in sc.GROUPS},
                                   size_rule="given" if circuits[w]["method"] == "given" else
                                   circuits[w].get("size_rule", "top-k"),
                                   sizing=circuits[w].get("sizing"))
                 for w in ("base", "ft")]
    faithfulness = [_faithfulness_score(faith[model][name], name, model) for name in ("base", "ft")
                    for model in ("base", "ft")]

    # per-prompt discovery effects (absent for given circuits and stages computed before they were kept)
    scores = {w: item_scores_from_rows(circuits[w].get("item_scores") or {}) for w in ("base", "ft")}
    pool = cards["base"]["n_layers"] * cards["base"]["n_heads"]
    overlap = circuit_overlap(circ["base"], circ["ft"], item_scores=(scores["base"], scores["ft"]), seed=seed,
                              pool=pool)
    overlap += equal_size_overlap(circ["base"], circ["ft"], pool)
    # every seed's selections go on the card: the overlap over seeds is computed from them, here and by submit
    dcm_selections = [sc.DcmSelection(w, s, g, d, [list(h) for h in hs]) for w in ("base", "ft")
                      for s, run in zip(dcm_seeds, dcm_runs[w], strict=True) for g, d, hs in run["selections"]]
    overlap += dcm_overlap(*dcm_seed_runs(dcm_selections, dcm_seeds), seed=seed)
    dcm_scores = [sc.DcmScore(**s) for w in ("base", "ft") for s in dcm_runs[w][0]["scores"]]
    # from the per-item rows, not the stage's stored scores: a statistic's fix reaches cached stages
    cmap_scores = scores_from_rows(cmap["items"], seed=seed)
    provenance = sc.Provenance(__version__, sc.BENCHMARK_VERSION, library_versions(), device, dtype)
    card = sc.from_dict(sc.to_dict(sc.Scorecard(
        base=sc.ModelCard(**cards["base"]), ft=sc.ModelCard(**cards["ft"]), config=config, config_hash=chash,
        provenance=provenance, accuracy=accuracy, circuits=summaries, faithfulness=faithfulness,
        ceilings=[_ceiling_score(w, faith[w]["ceilings"]) for w in ("base", "ft") if "ceilings" in faith[w]],
        overlap=overlap,
        dcm=dcm_scores, cmap=cmap_scores,
        semantics=[_semantics_score(w, r) for w in ("base", "ft") for r in semantics[w]["results"]],
        dcm_selections=dcm_selections, edges=section)))
    items = list(acc["base"]["items"]) + list(acc["ft"]["items"])
    for model in ("base", "ft"):
        for name in ("base", "ft"):
            items += [{"measure": "circuit_accuracy", "model": model, "circuit": name, "n_boxes": 7, "item": i,
                       "correct": bool(c)} for i, c in enumerate(faith[model][name]["circuit_correct"])]
    for model in ("base", "ft"):
        for ablation, flags in faith[model].get("ceilings", {}).get("items", {}).items():
            items += [{"measure": "ceiling", "model": model, "ablation": ablation, "n_boxes": 7, "item": i,
                       "correct": bool(c)} for i, c in enumerate(flags)]
    items += dcm_runs["base"][0]["items"] + dcm_runs["ft"][0]["items"] + cmap["items"]
    items += _rederivation_rows(circuits, faith, semantics)
    # the circuit-overlap CI's inputs, re-derived by submit: one row per (model, group, head, prompt)
    for model in ("base", "ft"):
        for group, heads in scores[model].items():
            items += [{"measure": "discovery_score", "model": model, "group": group, "layer": layer, "head": head,
                       "item": i, "score": x} for (layer, head), xs in heads.items() for i, x in enumerate(xs)]
    return card, items + edge_items


def _rederivation_rows(circuits, faith, semantics) -> list[dict[str, Any]]:
    """The rows that re-derive the random-circuit baselines (per draw), the sizing records (per sizing prompt:
    the model, the form, no heads, each curve point) and the semantics checks (per repeat): scorecard schema 3."""
    rows = []
    for model in ("base", "ft"):
        for name in ("base", "ft"):
            for d, flags in enumerate((faith[model][name].get("baseline") or {}).get("correct") or []):
                rows += [{"measure": "random_circuit", "model": model, "circuit": name, "draw": d, "n_boxes": 7,
                          "item": i, "correct": bool(c)} for i, c in enumerate(flags)]
    for w in ("base", "ft"):
        sized = circuits[w].get("sizing_items")
        if sized:
            for ablation in ("model", "form_all_heads", "no_heads"):
                rows += [{"measure": "sizing", "model": w, "circuit": w, "ablation": ablation, "n_boxes": 7, "item": i,
                          "correct": bool(c)} for i, c in enumerate(sized[ablation])]
            for k, flags in enumerate(sized["points"]):
                rows += [{"measure": "sizing", "model": w, "circuit": w, "point": k, "n_boxes": 7, "item": i,
                          "correct": bool(c)} for i, c in enumerate(flags)]
    for model in ("base", "ft"):
        for r in semantics[model]["results"]:
            for rep, flags in enumerate(r.get("correct") or []):
                rows += [{"measure": "semantics", "model": model, "heads": "base", "group": r["group"],
                          "desideratum": r["desideratum"], "draw": rep, "item": i, "correct": bool(c)}
                         for i, c in enumerate(flags)]
    return rows


def edges_section(results: dict[str, dict[str, Any]], seed: int) -> tuple[sc.EdgesScore, list[dict[str, Any]]]:
    """The scorecard's ``edges`` section from both sides' edges stages, and its per-prompt ``edge_effect`` rows
    (what ``submit`` re-derives the section from: ``edge_comparison.section_from_rows``)."""
    scores = {w: EdgeScores.from_dict(results[w]["scores"]) for w in ("base", "ft")}
    node_k = results["base"]["node_k"]
    rows = [r for w in ("base", "ft") for r in edge_rows(scores[w], w)]
    return section_of(scores["base"], scores["ft"], node_k, seed), rows
