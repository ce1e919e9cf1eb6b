"""``etbench score``: one run from a base/fine-tuned pair to a scorecard.

Stages (each cached on disk under the configuration hash, see ``etbench.stages``):

1. accuracy of both models at every box count (``etbench.accuracy``);
2. a circuit for each model: discovered (``etbench.circuits.discover``, fast or exact) or given;
3. faithfulness of each circuit on each model (``etbench.faithfulness.evaluate_circuit``), the
   paper's Table 1 being the base circuit on the fine-tuned model;
4. DCM on each model's own circuit (``etbench.dcm``), and head overlap of circuits and DCM heads;
5. CMAP: the fine-tuned model's DCM-filtered circuit heads patched into the base (``etbench.cmap``).

The scorecard holds numbers only; wall times go to ``timings.json`` so that a resumed or repeated run
writes a byte-identical ``scorecard.json``.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from . import scorecard as sc
from .errors import EtbenchError
from .fileio import atomic_write_json
from .stages import StageCache

DEFAULT_BASE, DEFAULT_FT = "tiny-base", "tiny-ft"


@dataclass(frozen=True)
class Preset:
    """Sizes of every stage. ``quick`` is sized for a 2-core CPU; ``paper`` uses the paper's sizes."""

    name: str
    accuracy_n: int
    accuracy_boxes: tuple[int, ...]
    discovery_mode: str
    discovery_n: int
    minimality_n: int
    faithfulness_n: int
    mean_n: int
    random_draws: int
    completeness_draws: int
    dcm: str  # a dcm.PRESETS name
    dcm_seeds: tuple[int, ...]
    dcm_groups: tuple[str, ...]  # groups whose heads get DCM masks
    cmap_n: int
    cmap_variants: tuple[str, ...]
    batch_size: int = 16
    minimality: str | None = None  # discovery's pruning: "pairs", "single", "none"; None = discover's default


PRESETS: dict[str, Preset] = {
    "quick": Preset("quick", accuracy_n=100, accuracy_boxes=(3, 5, 7), discovery_mode="fast", discovery_n=32,
                    minimality_n=32, faithfulness_n=50, mean_n=32, random_draws=10, completeness_draws=2,
                    dcm="quick", dcm_seeds=(0,), cmap_n=64, cmap_variants=("output", "qkv"),
                    # The structure reader's mask trains through almost the whole prompt (its position is
                    # early): ~85% of DCM time on CPU. CMAP patches the whole D group anyway (paper rule).
                    dcm_groups=("value_fetcher", "position_transmitter", "position_detector"),
                    # Measured on the tiny pair (n=32): single-node minimality pruned the fast circuits to
                    # 1 and 0 heads (each node alone moves faithfulness less than the threshold), leaving
                    # nothing to evaluate; so the quick preset keeps the verified top-k without pruning.
                    minimality="none"),
    "paper": Preset("paper", accuracy_n=500, accuracy_boxes=(3, 5, 7), discovery_mode="exact", discovery_n=300,
                    minimality_n=100, faithfulness_n=500, mean_n=500, random_draws=10, completeness_draws=10,
                    dcm="paper", dcm_seeds=(0, 1, 2), cmap_n=500,
                    cmap_variants=("output", "q", "k", "v", "qk", "qkv"),
                    dcm_groups=("value_fetcher", "position_transmitter", "position_detector", "structure_reader")),
}


@dataclass
class ScoreRun:
    """What ``score`` produced: the scorecard, where it is, and how long each computed stage took."""

    card: sc.Scorecard
    path: Path
    timings: dict[str, float] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # per computed stage


def _preset(name: str | Preset, discovery: str | None) -> Preset:
    if isinstance(name, Preset):
        preset = name
    elif name not in PRESETS:
        raise EtbenchError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    else:
        preset = PRESETS[name]
    if discovery is not None:
        from .circuits import MODES

        if discovery not in MODES:
            raise EtbenchError(f"discovery must be one of {', '.join(MODES)}, got {discovery!r}")
        preset = replace(preset, discovery_mode=discovery)
    return preset


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "peft", "lm-eval", "numpy", "scipy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    out["python"] = platform.python_version()
    return out


def _model_card(loaded, spec) -> sc.ModelCard:
    revision = getattr(getattr(loaded.model, "config", None), "_commit_hash", None)
    return sc.ModelCard(ref=loaded.ref, source=str(loaded.source), architecture=getattr(loaded.model.config, "model_type", "?"),
                        n_layers=spec.n_layers, n_heads=spec.n_heads, revision=revision)


def _circuit_spec(given: str | None) -> str | None:
    """Validate a ``--circuit`` reference early (a circuit file, ``paper:<name>`` or a shipped name),
    before any model is loaded; files are recorded by absolute path."""
    if given is None:
        return None
    from .circuits import load_circuit, paper_circuit

    if given.startswith("paper:"):
        paper_circuit(given[len("paper:"):])
    else:
        load_circuit(given)
    return str(Path(given).resolve()) if Path(given).exists() else given


def score(base: str = DEFAULT_BASE, ft: str = DEFAULT_FT, out_dir: str | Path = "etbench-out", *,
          preset: str | Preset = "quick", discovery: str | None = None, seed: int = 0, circuit_base: str | None = None,
          circuit_ft: str | None = None, dtype: str | None = None, device: str = "cpu",
          progress: bool = True, stage_plan=None) -> ScoreRun:
    """Score ``ft`` against ``base``; write ``scorecard.json`` (+ items, report, figures) to ``out_dir``.

    ``dtype=None``: bfloat16 on CUDA, float32 on CPU (``models.default_dtype``).
    ``stage_plan``: this worker's share of the stages (``StageCache``'s ``plan``; ``etbench.distributed``);
    a worker whose share ends raises ``stages.StagesHandedOff``."""
    from . import models

    dtype = models.default_dtype(device) if dtype is None else dtype
    p = _preset(preset, discovery)
    circuit_base, circuit_ft = _circuit_spec(circuit_base), _circuit_spec(circuit_ft)
    out_dir = Path(out_dir)
    config = {"benchmark_version": sc.BENCHMARK_VERSION, "base": base, "ft": ft, "seed": seed, "dtype": dtype,
              "preset": asdict(p), "circuit_base": circuit_base or "discover", "circuit_ft": circuit_ft or "discover"}
    from .dcm import preset as dcm_preset

    config["dcm"] = dcm_preset(p.dcm, seed=seed).to_dict()
    chash = sc.config_hash(config)
    cache = StageCache(out_dir / "stages", plan=stage_plan)
    ref = {"base": base, "ft": ft}
    common = {"benchmark_version": sc.BENCHMARK_VERSION, "seed": seed, "dtype": dtype, "batch_size": p.batch_size}

    # Models load lazily: a fully cached run (a resume after the last stage) never loads them.
    loaded: dict[str, Any] = {}

    def model(which: str):
        if which not in loaded:
            report = _stderr if progress else None
            if models.shares_base(base, ft):  # an unmerged adapter on this base: one copy of the base weights
                loaded["base"], loaded["ft"] = models.load_pair(base, ft, dtype=dtype, device=device, report=report)
            else:
                loaded[which] = models.load(base if which == "base" else ft, dtype=dtype, device=device, report=report)
        return loaded[which]

    # Fail fast on anything missing or incompatible before hours of work: both models must load
    # (one clear line otherwise) and share heads and tokenizer.
    cards = cache.run("models", {**common, **ref}, lambda: _models_stage(model, p))

    def accuracy_stage(which: str):
        from .accuracy import run as accuracy_run

        r = accuracy_run(model(which).ref, n_boxes=p.accuracy_boxes, n=p.accuracy_n, seed=seed,
                         batch_size=p.batch_size, progress=progress, loaded=model(which))
        return {"summaries": [x.summary() for x in r.results], "vocabulary_note": r.vocabulary_note,
                "items": [{"measure": "accuracy", "model": which, "n_boxes": x.n_boxes, "item": it.index,
                           "correct": it.correct} for x in r.results for it in x.items]}

    acc = {w: cache.run(f"accuracy_{w}", {**common, "model": ref[w], "n": p.accuracy_n, "boxes": p.accuracy_boxes},
                        lambda w=w: accuracy_stage(w)) for w in ("base", "ft")}

    def circuit_stage(which: str, given: str | None):
        from .circuits import discover, load_circuit

        if given is not None:
            return {"circuit": load_circuit(given).to_dict(), "method": "given", "forward_passes": {}}
        res = discover(model(which), mode=p.discovery_mode, n=p.discovery_n, seed=seed, batch_size=p.batch_size,
                       minimality_mode=p.minimality, minimality_n=p.minimality_n, mean_n=p.mean_n, model_name=model(which).ref, progress=progress)
        return {"circuit": res.circuit.to_dict(), "method": res.circuit.method, "forward_passes": res.forward_passes}

    discovery_settings = {"mode": p.discovery_mode, "n": p.discovery_n, "minimality_n": p.minimality_n,
                          "mean_n": p.mean_n, "minimality": p.minimality}
    given = {"base": circuit_base, "ft": circuit_ft}
    circuits = {w: cache.run(f"circuit_{w}", {**common, "model": ref[w], "given": given[w],
                                             "discovery": None if given[w] else discovery_settings},
                             lambda w=w: circuit_stage(w, given[w])) for w in ("base", "ft")}
    circuit_keys = {w: sc.config_hash(circuits[w]["circuit"]) for w in ("base", "ft")}

    def faithfulness_stage(which: str):
        from .circuits import Circuit
        from .faithfulness import evaluate_circuit, evaluation_runner

        m = model(which)
        # one runner for both circuits: the model's flags and the stored base runs are shared
        runner = evaluation_runner(m.model, m.tokenizer, 7, p.faithfulness_n, seed, p.mean_n, p.batch_size,
                                   progress=progress)
        out = {}
        for name in ("base", "ft"):
            circ = Circuit.from_dict(circuits[name]["circuit"])
            own = name == which
            ev = evaluate_circuit(m.model, circ, m.tokenizer, n_boxes=7, n=p.faithfulness_n, seed=seed,
                                  mean_n=p.mean_n, batch_size=p.batch_size, random_draws=p.random_draws,
                                  completeness_draws=p.completeness_draws if own else 0, curve=own,
                                  model_name=m.ref, progress=progress, runner=runner)
            out[name] = ev.to_dict()
        return out

    faith_settings = {"n": p.faithfulness_n, "mean_n": p.mean_n, "random_draws": p.random_draws,
                      "completeness_draws": p.completeness_draws, "circuits": circuit_keys}
    faith = {w: cache.run(f"faithfulness_{w}", {**common, "model": ref[w], **faith_settings},
                          lambda w=w: faithfulness_stage(w)) for w in ("base", "ft")}

    def dcm_stage(which: str, dcm_seed: int):
        from .circuits import Circuit
        from .dcm import train_masks

        m = model(which)
        circuit = Circuit.from_dict(circuits[which]["circuit"])
        if not circuit.size:  # e.g. a model at chance: discovery kept no head, there is nothing to mask
            return {"scores": [], "items": [], "selections": [], "note": "empty circuit: DCM not run"}
        groups = [g for g in p.dcm_groups if circuit.heads(g)]
        if not groups:
            return {"scores": [], "items": [], "selections": [], "note": "no DCM group has heads"}
        result = train_masks(m.model, m.tokenizer, circuit, dcm_preset(p.dcm, seed=dcm_seed), groups=groups,
                             model_name=m.ref, progress=progress)
        return {"scores": [asdict(s) for s in result.scores(which)], "items": result.item_rows(which),
                "selections": [[g, d, [list(h) for h in hs]] for (g, d), hs in result.selections().items()]}

    dcm_runs = {w: [cache.run(f"dcm_{w}_seed{s}", {**common, "model": ref[w], "circuit": circuit_keys[w],
                                                   "dcm": dcm_preset(p.dcm, seed=s).to_dict(), "groups": p.dcm_groups},
                              lambda w=w, s=s: dcm_stage(w, s)) for s in p.dcm_seeds]
                for w in ("base", "ft")}

    def semantics_stage(which: str):
        from .dcm import semantics_check

        cfg = dcm_preset(p.dcm, seed=seed)
        selections = {(g, d): [tuple(h) for h in hs] for g, d, hs in dcm_runs["base"][0]["selections"]}
        if not selections:
            return {"results": [], "note": "the base circuit has no DCM masks"}
        m = model(which)
        results = semantics_check(m.model, m.tokenizer, selections, n=cfg.semantics_n, repeats=cfg.semantics_repeats,
                                  seed=seed, batch_size=p.batch_size, model_name=m.ref, progress=progress)
        return {"results": [{"group": r.group, "desideratum": r.desideratum, "heads": [list(h) for h in r.heads],
                             "accuracies": list(r.accuracies), "n": r.n} for r in results]}

    semantics = {w: cache.run(f"semantics_{w}", {**common, "model": ref[w], "dcm_base": sc.config_hash(dcm_runs["base"][0]),
                                                 "n": dcm_preset(p.dcm).semantics_n,
                                                 "repeats": dcm_preset(p.dcm).semantics_repeats},
                              lambda w=w: semantics_stage(w)) for w in ("base", "ft")}

    def cmap_stage():
        from .circuits import Circuit
        from .cmap import paper_patch_heads, run_cmap
        from .data import generate

        selections = {(g, d): [tuple(h) for h in hs] for g, d, hs in dcm_runs["ft"][0]["selections"]}
        circuit = Circuit.from_dict(circuits["ft"]["circuit"])
        heads = paper_patch_heads(circuit, selections) if circuit.size else {}
        if not any(heads.values()):
            return {"scores": [], "items": [], "heads": {}, "note": "no fine-tuned circuit heads to patch"}
        examples = generate(n_boxes=7, n=p.cmap_n, seed=seed)
        result = run_cmap(model("base").model, model("ft").model, model("base").tokenizer, heads, examples,
                          tokenizer_ft=model("ft").tokenizer, variants=p.cmap_variants, batch_size=p.batch_size,
                          base_name=base, ft_name=ft, progress=progress)
        return {"scores": [asdict(s) for s in result.scores(seed=seed)], "items": result.item_rows(),
                "heads": {g: [list(h) for h in hs] for g, hs in heads.items()}}

    cmap = cache.run("cmap", {**common, **ref, "n": p.cmap_n, "variants": p.cmap_variants,
                              "circuit_ft": circuit_keys["ft"], "dcm_ft": sc.config_hash(dcm_runs["ft"][0])}, cmap_stage)

    card, items = _assemble(config, chash, cards, acc, circuits, faith, dcm_runs, cmap, semantics, seed, dtype, device)
    path = sc.save(card, out_dir, items)
    for which in ("base", "ft"):
        atomic_write_json(out_dir / f"circuit_{which}.json", circuits[which]["circuit"])
    _write_report(card, items, out_dir)
    cached = sorted(set(_stage_names(p)) - set(cache.ran))
    atomic_write_json(out_dir / "timings.json", {"computed_s": cache.timings, "peak_rss_mb": cache.peak_rss_mb,
                                                 "cached": cached})
    return ScoreRun(card, path, dict(cache.timings), cached, dict(cache.peak_rss_mb))


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _stage_names(p: Preset) -> list[str]:
    names = ["models", "accuracy_base", "accuracy_ft", "circuit_base", "circuit_ft", "faithfulness_base",
             "faithfulness_ft", "semantics_base", "semantics_ft", "cmap"]
    return names + [f"dcm_{w}_seed{s}" for w in ("base", "ft") for s in p.dcm_seeds]


def _models_stage(model, p: Preset) -> dict[str, Any]:
    from .cmap import check_compatible
    from .data import generate
    from .heads import head_map

    b, f = model("base"), model("ft")
    spec_b, spec_f = head_map(b.model).spec, head_map(f.model).spec
    check_compatible(b.model, f.model, b.tokenizer, f.tokenizer, generate(7, 7, seed=0))
    return {"base": asdict(_model_card(b, spec_b)), "ft": asdict(_model_card(f, spec_f))}


def _faithfulness_score(ev: dict[str, Any], circuit: str, model: str) -> sc.FaithfulnessScore:
    def prop(d) -> sc.Estimate:
        return sc.Estimate(d["value"], d["ci95"][0], d["ci95"][1], d["n"], d["method"])

    low, high = ev["faithfulness_ci"]
    b = ev.get("baseline") or {}
    accs = b.get("accuracies") or []
    random_est = sc.Estimate(b.get("mean"), min(accs) if accs else None, max(accs) if accs else None, len(accs),
                             "random circuits, same group sizes",
                             note=f"low/high = min/max over draws; sd {b.get('sd', float('nan')):.3f}" if accs else "")
    return sc.FaithfulnessScore(
        circuit=circuit, model=model, model_accuracy=prop(ev["model_acc"]), circuit_accuracy=prop(ev["circuit_acc"]),
        faithfulness=sc.Estimate(ev["faithfulness"], low, high, ev["n"], "paired-bootstrap ratio"),
        random_circuit_accuracy=random_est)


def _semantics_score(model: str, r: dict[str, Any]) -> sc.SemanticsScore:
    import statistics

    accs = r["accuracies"]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return sc.SemanticsScore("base", model, r["group"], r["desideratum"], r["heads"], sc.Estimate(
        statistics.fmean(accs), min(accs), max(accs), r["n"], f"mean over {len(accs)} repeats with fresh sources",
        note=f"low/high = min/max over repeats; sd {sd:.3f}"))


def _assemble(config, chash, cards, acc, circuits, faith, dcm_runs, cmap, semantics, seed, dtype, device):
    from .circuits import Circuit
    from .overlap import circuit_overlap, dcm_overlap, selected_by_group

    accuracy = []
    for which in ("base", "ft"):
        for s in acc[which]["summaries"]:
            accuracy.append(sc.AccuracyScore(which, s["n_boxes"], sc.Estimate(
                s["accuracy"], s["ci95"][0], s["ci95"][1], s["n"], s["ci_method"])))
    circ = {w: Circuit.from_dict(circuits[w]["circuit"]) for w in ("base", "ft")}
    summaries = [sc.CircuitSummary(name=w, found_on=config[w] if circuits[w]["method"] != "given" else "given",
                                   method=circuits[w]["method"],
                                   heads={g: [list(h) for h in circ[w].heads(g)] for g in sc.GROUPS})
                 for w in ("base", "ft")]
    faithfulness = [_faithfulness_score(faith[model][name], name, model) for name in ("base", "ft")
                    for model in ("base", "ft")]

    def selections(run) -> dict:
        return {(g, d): tuple(tuple(h) for h in hs) for g, d, hs in run["selections"]}

    overlap = circuit_overlap(circ["base"], circ["ft"]) + dcm_overlap(
        [selected_by_group(selections(r)) for r in dcm_runs["base"]],
        [selected_by_group(selections(r)) for r in dcm_runs["ft"]], seed=seed)
    dcm_scores = [sc.DcmScore(**s) for w in ("base", "ft") for s in dcm_runs[w][0]["scores"]]
    cmap_scores = [sc.CmapScore(**s) for s in cmap["scores"]]
    provenance = sc.Provenance(__version__, sc.BENCHMARK_VERSION, _library_versions(), device, dtype)
    card = sc.from_dict(sc.to_dict(sc.Scorecard(
        base=sc.ModelCard(**cards["base"]), ft=sc.ModelCard(**cards["ft"]), config=config, config_hash=chash,
        provenance=provenance, accuracy=accuracy, circuits=summaries, faithfulness=faithfulness, overlap=overlap,
        dcm=dcm_scores, cmap=cmap_scores,
        semantics=[_semantics_score(w, r) for w in ("base", "ft") for r in semantics[w]["results"]])))
    items = list(acc["base"]["items"]) + list(acc["ft"]["items"])
    for model in ("base", "ft"):
        for name in ("base", "ft"):
            items += [{"measure": "circuit_accuracy", "model": model, "circuit": name, "n_boxes": 7, "item": i,
                       "correct": bool(c)} for i, c in enumerate(faith[model][name]["circuit_correct"])]
    items += dcm_runs["base"][0]["items"] + dcm_runs["ft"][0]["items"] + cmap["items"]
    return card, items


def _write_report(card: sc.Scorecard, items: list[dict[str, Any]], out_dir: Path) -> None:
    from .report import scorecard_report, write_doc

    write_doc(scorecard_report(card, items), out_dir, stem="report")


def format_scorecard(card: sc.Scorecard) -> str:
    """The four metric families as terminal tables."""
    from tabulate import tabulate

    def est(e: sc.Estimate) -> str:
        if e.value is None:
            return f"undefined ({e.note})" if e.note else "undefined"
        if e.low is None or e.high is None:
            return f"{e.value:.3f}"
        return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"

    parts = [f"scorecard: {card.ft.ref} vs base {card.base.ref}  (config {card.config_hash}, preset "
             f"{card.config.get('preset', {}).get('name', '?')})"]
    acc = {(a.model, a.n_boxes): a.accuracy for a in card.accuracy}
    boxes = sorted({b for _, b in acc})
    parts.append("\n1. full-model accuracy (greedy top-1 over the vocabulary, 95% CI)\n" + tabulate(
        [[b, est(acc[("base", b)]), est(acc[("ft", b)])] for b in boxes], headers=["boxes", "base", "fine-tuned"],
        tablefmt="github"))
    parts.append("\n2. circuit faithfulness (circuit acc / model acc, mean-ablated, 95% CI)\n" + tabulate(
        [[f.circuit, f.model, est(f.circuit_accuracy), est(f.faithfulness), est(f.random_circuit_accuracy)]
         for f in card.faithfulness],
        headers=["circuit", "on model", "circuit acc", "faithfulness", "random circuit acc"], tablefmt="github"))
    parts.append("\n3. head overlap, base heads found in the fine-tuned set\n" + tabulate(
        [[o.heads, o.group, est(o.base_in_ft), est(o.jaccard)] for o in card.overlap],
        headers=["heads", "group", "base in ft", "jaccard"], tablefmt="github"))
    if card.dcm:
        parts.append("\n   DCM heads per group x desideratum (test accuracy against the desideratum's target)\n" + tabulate(
            [[d.circuit, d.group, d.desideratum, len(d.selected_heads), est(d.test_accuracy)] for d in card.dcm],
            headers=["circuit", "group", "desideratum", "heads", "test acc"], tablefmt="github"))
    if card.semantics:
        parts.append("\n   semantics check: base DCM heads patched into each model (min/max over repeats)\n" + tabulate(
            [[s.model, s.group, s.desideratum, len(s.heads), est(s.accuracy)] for s in card.semantics],
            headers=["into", "group", "desideratum", "heads", "acc"], tablefmt="github"))
    parts.append("\n4. CMAP: fine-tuned heads patched into the base (gain = patched - base accuracy)\n" + tabulate(
        [[c.variant, c.group, est(c.patched_accuracy), est(c.gain), est(c.normalised_gain)] for c in card.cmap],
        headers=["variant", "group", "patched acc", "gain", "normalised gain"], tablefmt="github"))
    return "\n".join(parts)


def format_timings(run: ScoreRun) -> str:
    lines = [f"  {name}: {secs:.1f} s" + (f", peak {run.peak_rss_mb[name]:.0f} MB" if name in run.peak_rss_mb else "")
             for name, secs in run.timings.items()]
    cached = f"\n  from cache: {', '.join(run.cached_stages)}" if run.cached_stages else ""
    return "stage times:" + "".join("\n" + line for line in lines) + cached

