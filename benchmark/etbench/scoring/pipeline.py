"""``etbench score``: one run from a base/fine-tuned pair to a scorecard.

Stages (each cached on disk under the configuration hash, see ``etbench.scoring.stages``):

1. accuracy of both models at every box count (``etbench.metrics.accuracy``);
2. a circuit for each model: discovered (``etbench.metrics.discovery``, fast or exact) or given;
3. DCM on each model's own circuit (``etbench.metrics.dcm``), and head overlap of circuits and DCM heads;
4. faithfulness of each circuit on each model (``etbench.metrics.faithfulness``), the
   paper's Table 1 being the base circuit on the fine-tuned model;
5. the semantics check of the base's DCM heads on each model;
6. CMAP: the fine-tuned model's DCM-filtered circuit heads patched into the base (``etbench.metrics.cmap``).

DCM comes before faithfulness because it needs only its own model's circuit: under ``etbench score-many``
a side runs it while the other side's circuit, which faithfulness needs, may still be in progress.

The scorecard holds numbers only; wall times go to ``timings.json`` so that a resumed or repeated run
writes a byte-identical ``scorecard.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from etbench import __version__, models
from etbench.core.checks import check_seed
from etbench.core.errors import EtbenchError
from etbench.core.io import (
    Writer,
    atomic_write_json,
    check_output_dir,
    claim_outputs,
    config_hash,
    jsonable,
    refuse_foreign_files,
)
from etbench.core.stats import mib_ci, mib_normalised
from etbench.mech.heads import head_map
from etbench.mech.nnsight_backend import load_remote, ndif_api_key
from etbench.metrics.accuracy import run as accuracy_run
from etbench.metrics.cmap import check_compatible, paper_patch_heads, run_cmap
from etbench.metrics.dcm import dcm_preset, semantics_check, train_masks
from etbench.metrics.discovery import discover
from etbench.metrics.faithfulness import evaluate_circuit, evaluation_runner
from etbench.metrics.sizing import ceilings
from etbench.models.adapter import load_pair
from etbench.schema import scorecard as sc
from etbench.schema.circuit import Circuit, load_circuit, paper_circuit
from etbench.scoring.assemble import assemble_scorecard, library_versions, model_card
from etbench.scoring.presets import DEFAULT_BASE, DEFAULT_FT, Preset, resolve_preset
from etbench.scoring.stages import Deferred, StageCache
from etbench.task.layout import usable_pool
from etbench.task.prompts import generate


@dataclass
class ScoreRun:
    """What ``score`` produced: the scorecard, where it is, and how long each computed stage took."""

    card: sc.Scorecard
    path: Path
    timings: dict[str, float] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # per computed stage
    items: list[dict[str, Any]] = field(default_factory=list)  # per-item rows (items.jsonl)
    reused_stages: list[str] = field(default_factory=list)  # copied from other runs (``reuse_stages``)


def _circuit_spec(given: str | None) -> tuple[str | None, str | None]:
    """Validate a ``--circuit`` reference early (a circuit file, ``paper:<name>`` or a shipped name),
    before any model is loaded. Returns (what to load, how the config records it): a file is recorded
    by its name and content hash, never by its local path."""
    if given is None:
        return None, None
    if given.startswith("paper:"):
        paper_circuit(given[len("paper:"):])
        return given, given
    circuit = load_circuit(given)
    if Path(given).exists():
        return str(Path(given).resolve()), f"file:{Path(given).name}#{config_hash(circuit.to_dict())}"
    return given, given


def _same_weights(a: models.ModelSpec, b: models.ModelSpec) -> bool:
    def key(s: models.ModelSpec | None):
        if s is None:
            return None
        location = str(Path(s.location).resolve()) if Path(s.location).exists() else s.location
        return (s.kind, location, s.revision, key(s.base))
    return key(a) == key(b)


#: What a remote run records as its dtype and device: NDIF's, not chosen (or known) here.
REMOTE_DTYPE, REMOTE_DEVICE = "as-hosted", "ndif"

#: The two models of a pair, in the order their stages and rows are always listed.
SIDES = ("base", "ft")


#: The note a remote run's DCM and semantics stages record instead of results.
REMOTE_DCM_NOTE = ("not run: --remote (DCM trains masks by gradient descent, hundreds of passes with "
                   "gradients; NDIF runs etbench's forward passes only)")

_KIND_NAMES = {"directory": "a local model directory", "gguf": "a GGUF file",
               "peft": "an adapter (NDIF serves hosted base weights, not adapters)"}


def check_remote(base: str, ft: str, *, circuit_base: str | None, circuit_ft: str | None, dtype: str | None,
                 device: str, share_base_weights: bool, api_key: str | None = None) -> None:
    """What a remote (NDIF) run needs, checked before anything is loaded or written: both models hub ids
    (NDIF hosts hub models only), both circuits given (discovery does not run remotely), no local
    dtype/device/sharing options, and an NDIF API key."""
    check_no_local_options({"--dtype": dtype is not None, "--device": device != "cpu",
                            "--share-base-weights": share_base_weights})
    check_remote_model("--base", base)
    check_remote_model("--ft", ft)
    missing = [flag for flag, given in (("--circuit-base", circuit_base), ("--circuit-ft", circuit_ft)) if not given]
    if missing:
        raise EtbenchError(f"--remote: circuit discovery does not run on NDIF (fast discovery needs gradients, "
                           f"exact discovery thousands of patched passes): give {' and '.join(missing)} "
                           "(a circuit file or paper:<name>; `etbench circuit discover` finds one locally)")
    ndif_api_key(api_key)  # nnsight itself is imported only now (it mounts .save() on every object)


def check_no_local_options(given: dict[str, bool]) -> None:
    """A remote run refuses the options that choose local precision, placement or loading."""
    for flag, is_given in given.items():
        if is_given:
            raise EtbenchError(f"--remote runs on NDIF's GPUs, in the dtype NDIF loaded the model in: {flag} "
                               "does not apply")


def check_remote_model(flag: str, ref: str) -> models.ModelSpec:
    """``ref``'s spec if NDIF could host it (a hub id, not a local directory, GGUF file or adapter)."""
    spec = models.resolve(ref)
    if spec.kind != "hub" or Path(ref).expanduser().exists():
        raise EtbenchError(f"--remote: {flag} {ref} is {_KIND_NAMES.get(spec.kind, 'not a hub model')}; "
                           "NDIF hosts Hugging Face hub models only: give a hub id NDIF serves "
                           "(nnsight.ndif.status() lists them)")
    return spec


#: What ``score`` writes into its output directory: ``SCORE_DATA_OUTPUTS`` here, the report in ``etbench.score``.
#: Each is listed in the manifest there just before it is written, so a later run replaces it; a file of one
#: of these names that no run wrote is refused up front.
SCORE_WRITER = Writer("etbench score", ".etbench-score-manifest.json")
SCORE_DATA_OUTPUTS = ("scorecard.json", "items.jsonl", "circuit_base.json", "circuit_ft.json", "timings.json")
SCORE_REPORT_STEM = "report"
SCORE_REPORT_OUTPUTS = (f"{SCORE_REPORT_STEM}.md", f"{SCORE_REPORT_STEM}.html")
SCORE_OUTPUTS = SCORE_DATA_OUTPUTS + SCORE_REPORT_OUTPUTS


def check_inputs(base: str, ft: str, out_dir: str | Path, *, seed: int, dtype: str, device: str,
                 remote: bool = False, extra_outputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything ``score`` can check before loading a model (seed, dtype, device, ``out_dir`` writable and
    holding no file of an output's name that an earlier run did not write, both models resolvable and
    distinct; ``extra_outputs``: the caller's own further files there). Returns each model's published identity
    (ref, source, weights revision)."""
    check_seed(seed)
    if not remote:  # a remote run's dtype and device are NDIF's
        models.check_dtype(dtype)
        models.check_device(device)
    check_output_dir(out_dir)
    refuse_foreign_files(Path(out_dir), dict.fromkeys(SCORE_OUTPUTS + extra_outputs), SCORE_WRITER)
    specs = {"base": models.resolve(base), "ft": models.resolve(ft)}
    if _same_weights(specs["base"], specs["ft"]):
        raise EtbenchError(f"--base and --ft are the same model ({base}): score a fine-tuned model against the "
                           "model it was tuned from")
    if not remote:
        # the revision keys every stage: a GGUF assembled only at the first load had none on a fresh machine,
        # so a fresh run's stages were keyed (and its scorecard published) without it, and a later run
        # recomputed them all
        for spec in specs.values():
            models.materialise_sources(spec)
    return {w: {"ref": models.published_ref(r), "source": models.published_source(specs[w]),
                "revision": models.spec_revision(specs[w])} for w, r in (("base", base), ("ft", ft))}


def score(base: str = DEFAULT_BASE, ft: str = DEFAULT_FT, out_dir: str | Path = "etbench-out", *,
          preset: str | Preset = "quick", discovery: str | None = None, seed: int = 0, circuit_base: str | None = None,
          circuit_ft: str | None = None, dtype: str | None = None, device: str = "cpu",
          progress: bool = True, stage_plan=None, share_base_weights: bool = False, remote: bool = False,
          ndif_key: str | None = None, reuse_stages: Sequence[str | Path] = ()) -> ScoreRun:
    """Score ``ft`` against ``base``; write ``scorecard.json`` (+ items, circuits, timings) to ``out_dir``.
    ``etbench.score`` also writes the report.

    ``dtype=None``: bfloat16 on CUDA, float32 on CPU (``models.default_dtype``).
    ``share_base_weights``: load an unmerged adapter fine-tune and its base as one copy of the base weights.
    ``stage_plan``: this worker's share of the stages (``StageCache``'s ``plan``; ``scoring.distributed``);
    a worker whose share ends raises ``stages.StagesHandedOff``.
    ``remote``: run every forward pass on NDIF through nnsight (``check_remote`` says what that needs):
    accuracy, faithfulness (with the ceilings) and CMAP run there on the given circuits; DCM and the
    semantics check record ``REMOTE_DCM_NOTE`` instead, so CMAP patches the fine-tuned circuit's heads
    (the "circuit" head set) and not the DCM-filtered ones. ``ndif_key``: the NDIF API key (default:
    ``NDIF_API_KEY``, else the key ``nnsight login`` stored).
    ``reuse_stages``: other runs' directories (or their ``stages/``), read only: a stage stored there under
    this run's key (e.g. the base side of another fine-tune of the same base, same preset and seed) is
    copied instead of computed; anything else there is ignored."""
    p = resolve_preset(preset, discovery)
    if remote:
        check_remote(base, ft, circuit_base=circuit_base, circuit_ft=circuit_ft, dtype=dtype, device=device,
                     share_base_weights=share_base_weights, api_key=ndif_key)
        dtype, device = REMOTE_DTYPE, REMOTE_DEVICE
    dtype = models.default_dtype(device) if dtype is None else dtype
    identity = check_inputs(base, ft, out_dir, seed=seed, dtype=dtype, device=device, remote=remote)
    sources = stage_sources(reuse_stages)
    (circuit_base, recorded_base), (circuit_ft, recorded_ft) = _circuit_spec(circuit_base), _circuit_spec(circuit_ft)
    out_dir = Path(out_dir)
    config = {"benchmark_version": sc.BENCHMARK_VERSION, "base": identity["base"]["ref"],
              "ft": identity["ft"]["ref"], "seed": seed, "dtype": dtype, "preset": asdict(p),
              "circuit_base": recorded_base or "discover", "circuit_ft": recorded_ft or "discover"}

    config["dcm"] = dcm_preset(p.dcm, seed=seed).to_dict()
    if remote:  # only then: a local run's config (and so its hash and cached stages) is unchanged
        config["execution"] = REMOTE_DEVICE
    chash = config_hash(config)
    # what the scorecard's provenance says made its numbers, beyond the stage keys (and the base weights
    # shared with the adapter, ~1e-7 off in the logits): a stage of another run is taken only when the same
    made_with = {"etbench": __version__, "libraries": library_versions(), "device": device,
                 "shared_base_weights": bool(share_base_weights and models.shares_base(base, ft))}
    cache = StageCache(out_dir / "stages", plan=stage_plan, sources=sources, made_with=made_with)

    def per_side(stage: str, depends: Callable[[str], Any], compute: Callable[[str], Any]) -> dict[str, Deferred]:
        """Stage ``stage`` (``{}`` marks the side, e.g. ``"circuit_{}"``) of both sides, keyed base then ft,
        scheduled by ``StageCache.schedule``: a score-many worker computes its own side now and reads the
        other side's only when it uses it (``.value``)."""
        return {w: cache.schedule(stage.format(w), lambda w=w: depends(w), lambda w=w: compute(w)) for w in SIDES}

    def resolved(stages: dict[str, Deferred]) -> dict[str, Any]:
        return {w: stages[w].value for w in SIDES}

    # Stages are keyed by the weights' revision, not only the name: new weights under an old alias recompute.
    ref = {w: {"ref": identity[w]["ref"], "revision": identity[w]["revision"]} for w in SIDES}
    common = {"benchmark_version": sc.BENCHMARK_VERSION, "seed": seed, "dtype": dtype, "batch_size": p.batch_size,
              **({"execution": REMOTE_DEVICE} if remote else {})}

    # Models load lazily: a fully cached run (a resume after the last stage) never loads them.
    loaded: dict[str, Any] = {}

    def model(which: str):
        if which not in loaded and remote:
            spec = check_remote_model(f"--{which}", base if which == "base" else ft)
            loaded[which] = load_remote(identity[which]["ref"], spec.location, revision=spec.revision,
                                        api_key=ndif_key)
        if which not in loaded:
            report = _stderr if progress else None
            # One copy of the base weights for an unmerged adapter on this base (7B memory), when asked for:
            # the base then runs with the adapter switched off, equal to a separate copy only to ~1e-7 in
            # the logits (measured), so the default keeps two copies and byte-reproducible scorecards.
            if share_base_weights and models.shares_base(base, ft):
                pair = load_pair(base, ft, dtype=dtype, device=device, report=report)
                loaded["base"], loaded["ft"] = (replace(m, ref=identity[w]["ref"]) for m, w in zip(pair, SIDES))
            else:
                # named by the published ref: model names reach per-item rows, which are published
                loaded[which] = replace(models.load(base if which == "base" else ft, dtype=dtype, device=device,
                                                    report=report), ref=identity[which]["ref"])
        return loaded[which]

    # Fail fast on anything missing or incompatible before hours of work: both models must load
    # (one clear line otherwise) and share heads and tokenizer.
    # (a score-many base worker defers it: only the scorecard reads it, and the ft worker writes that)
    cards = cache.schedule("models", lambda: {**common, **ref}, lambda: _models_stage(model, p, identity))

    def accuracy_stage(which: str):

        r = accuracy_run(model(which).ref, n_boxes=p.accuracy_boxes, n=p.accuracy_n, seed=seed,
                         batch_size=p.batch_size, progress=progress, loaded=model(which))
        return {"summaries": [x.summary() for x in r.results], "vocabulary_note": r.vocabulary_note,
                "items": [{"measure": "accuracy", "model": which, "n_boxes": x.n_boxes, "item": it.index,
                           "correct": it.correct} for x in r.results for it in x.items]}

    acc = per_side("accuracy_{}", lambda w: {**common, "model": ref[w], "n": p.accuracy_n, "boxes": p.accuracy_boxes},
                   accuracy_stage)

    def circuit_stage(which: str, given: str | None):

        if given is not None:
            return {"circuit": load_circuit(given).to_dict(), "method": "given", "forward_passes": {}}
        res = discover(model(which), mode=p.discovery_mode, n=p.discovery_n, seed=seed, batch_size=p.batch_size,
                       minimality_mode=p.minimality, minimality_n=p.minimality_n, mean_n=p.mean_n,
                       size=p.circuit_size, target_fraction=p.target_fraction, sizing_n=p.sizing_n,
                       model_name=model(which).ref, progress=progress)
        sizing = None
        if res.growth is not None:
            g, c = res.growth, res.ceilings
            sizing = {"target_fraction": g.target_fraction, "target_faithfulness": g.target_faithfulness,
                      "reached": g.reached, "chosen": g.chosen, "strategy": g.strategy, "note": g.note,
                      "n": c.n, "mean_n": c.mean_n, "prompts": "seed + 1 stream (held out from evaluation)",
                      "form_faithfulness": c.form_faithfulness, "model_accuracy": c.model.value,
                      "no_heads_accuracy": c.no_heads.value,
                      "curve": [{"size": st.size, "sizes": st.sizes, "accuracy": st.accuracy,
                                 "faithfulness": st.faithfulness, "mib": st.mib, "added": st.added, "scale": st.scale}
                                for st in g.steps]}
            # per sizing prompt, the rows submit re-derives the sizing record from (assemble_scorecard)
            sizing_items = {"model": list(c.model_correct), "form_all_heads": list(c.form_correct),
                            "no_heads": list(c.none_correct), "points": [list(st.correct) for st in g.steps]}
        # jsonable: a ratio over a model at 0 accuracy is NaN, stored as null (JSON has no NaN)
        # item_scores: per-prompt effects of each group's top heads, for the circuit-overlap CI
        return {"circuit": res.circuit.to_dict(), "method": res.circuit.method, "forward_passes": res.forward_passes,
                "size_rule": p.circuit_size, "sizing": jsonable(sizing), "item_scores": res.item_score_rows(),
                **({"sizing_items": sizing_items} if sizing is not None else {})}

    discovery_settings = {"mode": p.discovery_mode, "n": p.discovery_n, "minimality_n": p.minimality_n,
                          "mean_n": p.mean_n, "minimality": p.minimality, "size": p.circuit_size,
                          "target_fraction": p.target_fraction, "sizing_n": p.sizing_n}
    if p.circuit_size == "faithfulness":  # a circuit cached under an earlier growth rule is a different circuit
        discovery_settings["growth"] = "scaled-shape, magnitude order"
        discovery_settings["sizing_items"] = True  # stored before the per-prompt sizing rows were kept: recompute
    given = {"base": circuit_base, "ft": circuit_ft}
    recorded = {"base": recorded_base, "ft": recorded_ft}
    circuits = per_side("circuit_{}", lambda w: {**common, "model": ref[w], "given": recorded[w],
                                                 "discovery": None if given[w] else discovery_settings},
                        lambda w: circuit_stage(w, given[w]))

    def circuit_key(which: str) -> str:
        return config_hash(circuits[which].value["circuit"])

    def dcm_stage(which: str, dcm_seed: int):

        if remote:
            return {"scores": [], "items": [], "selections": [], "note": REMOTE_DCM_NOTE}
        m = model(which)
        circuit = Circuit.from_dict(circuits[which].value["circuit"])
        if not circuit.size:  # e.g. a model at chance: discovery kept no head, there is nothing to mask
            return {"scores": [], "items": [], "selections": [], "note": "empty circuit: DCM not run"}
        groups = [g for g in p.dcm_groups if circuit.heads(g)]
        if not groups:
            return {"scores": [], "items": [], "selections": [], "note": "no DCM group has heads"}
        result = train_masks(m.model, m.tokenizer, circuit, dcm_preset(p.dcm, seed=dcm_seed), groups=groups,
                             model_name=m.ref, progress=progress)
        return {"scores": [asdict(s) for s in result.scores(which)], "items": result.item_rows(which),
                "selections": [[g, d, [list(h) for h in hs]] for (g, d), hs in result.selections().items()]}

    # seeds by side, base first: a worker's deferred other side does not hold up its own
    dcm_runs = {w: [cache.schedule(f"dcm_{w}_seed{s}",
                                   lambda w=w, s=s: {**common, "model": ref[w], "circuit": circuit_key(w),
                                                     "dcm": dcm_preset(p.dcm, seed=s).to_dict(), "groups": p.dcm_groups},
                                   lambda w=w, s=s: dcm_stage(w, s)) for s in p.dcm_seeds] for w in SIDES}

    def faithfulness_stage(which: str):

        m = model(which)
        # one runner for both circuits (the model's flags and the stored base runs are shared), built on
        # first need: a stage whose parts are all stored already (a second fine-tune of this base) never
        # computes the mean activations
        runner = Deferred(lambda: evaluation_runner(m.model, m.tokenizer, 7, p.faithfulness_n, seed, p.mean_n,
                                                    p.batch_size, progress=progress))
        shared = faith_part_depends(which)

        def ceilings_part():
            # the form's ceilings and the floor on the same prompts and mean as the circuits' rows
            ceil = ceilings(runner.value, seed)
            return {
                "form": ceil.form, "n": ceil.n, "mean_n": ceil.mean_n,
                **{k: {"k": getattr(ceil, k).k, "n": getattr(ceil, k).n, "value": getattr(ceil, k).value,
                       "ci95": [getattr(ceil, k).low, getattr(ceil, k).high]}
                   for k in ("model", "every_head_every_position", "form_all_heads", "no_heads")},
                "form_faithfulness": ceil.form_faithfulness, "form_faithfulness_ci": list(ceil.form_faithfulness_ci),
                "form_mib": ceil.form_mib, "form_mib_ci": list(mib_ci(ceil.form_correct, ceil.model_correct,
                                                                      ceil.none_correct, seed)),
                # per-item flags of the ablation runs (the model's are the accuracy items): submit re-derives
                # from them
                "items": {"every_head_every_position": list(ceil.every_correct),
                          "form_all_heads": list(ceil.form_correct), "no_heads": list(ceil.none_correct)}}

        # Parts, each stored on its own: the model's ceilings and each circuit's evaluation on it depend on
        # that model and circuit only, so every further fine-tune of one base recomputes on the base model
        # just its own circuit (the base circuit's evaluation with completeness is the larger part)
        ceil = cache.run(f"faithfulness_{which}_ceilings", shared, ceilings_part, follow_plan=False)
        out = {"ceilings": ceil}
        for name in SIDES:
            circ = Circuit.from_dict(circuits[name].value["circuit"])
            own = name == which

            def circuit_part(circ=circ, own=own):
                # curve=False: the scorecard's record of a circuit over size is the circuit stage's sizing
                # curve; this one (the own circuit's ranking cut on a log grid: 7 of its 28 evaluations in
                # a quick-preset run) reached no scorecard field
                return evaluate_circuit(m.model, circ, m.tokenizer, n_boxes=7, n=p.faithfulness_n, seed=seed,
                                        mean_n=p.mean_n, batch_size=p.batch_size, random_draws=p.random_draws,
                                        completeness_draws=p.completeness_draws if own else 0, curve=False,
                                        model_name=m.ref, progress=progress, runner=runner.value).to_dict()

            ev = cache.run(f"faithfulness_{which}_of_{name}",
                           {**shared, "circuit": circuit_key(name),
                            "completeness_draws": p.completeness_draws if own else 0},
                           circuit_part, follow_plan=False)
            ev["mib"] = mib_normalised(ev["circuit_acc"]["value"], ev["model_acc"]["value"],
                                       ceil["no_heads"]["value"])
            ev["mib_ci"] = list(mib_ci(ev["circuit_correct"], ev["model_correct"], ceil["items"]["no_heads"], seed))
            out[name] = ev
        return out

    def faith_part_depends(which: str) -> dict[str, Any]:
        # results without the ceilings' per-item flags cannot be submitted: compute them again
        return {**common, "model": ref[which], "n": p.faithfulness_n, "mean_n": p.mean_n,
                "random_draws": p.random_draws, "ceiling_items": True, "random_items": True}

    def faith_depends(which: str) -> dict[str, Any]:
        # the parts' inputs plus both circuits (under score-many the first point where a side waits for the
        # other's circuit); keys are canonical JSON, so this is the key the stage always had
        return {**faith_part_depends(which), "completeness_draws": p.completeness_draws,
                "circuits": {w: circuit_key(w) for w in SIDES}}

    faith = per_side("faithfulness_{}", faith_depends, faithfulness_stage)

    def semantics_stage(which: str):

        if remote:
            return {"results": [], "note": REMOTE_DCM_NOTE}
        cfg = dcm_preset(p.dcm, seed=seed)
        selections = {(g, d): [tuple(h) for h in hs] for g, d, hs in dcm_runs["base"][0].value["selections"]}
        if not selections:
            return {"results": [], "note": "the base circuit has no DCM masks"}
        m = model(which)
        results = semantics_check(m.model, m.tokenizer, selections, n=cfg.semantics_n, repeats=cfg.semantics_repeats,
                                  seed=seed, batch_size=p.batch_size, model_name=m.ref, progress=progress)
        return {"results": [{"group": r.group, "desideratum": r.desideratum, "heads": [list(h) for h in r.heads],
                             "accuracies": list(r.accuracies), "n": r.n, "correct": [list(c) for c in r.correct]}
                            for r in results]}

    semantics = per_side("semantics_{}", lambda w: {
        **common, "model": ref[w], "dcm_base": config_hash(dcm_runs["base"][0].value),
        "n": dcm_preset(p.dcm).semantics_n, "repeats": dcm_preset(p.dcm).semantics_repeats, "repeat_items": True},
        semantics_stage)

    def cmap_stage():

        selections = {(g, d): [tuple(h) for h in hs] for g, d, hs in dcm_runs["ft"][0].value["selections"]}
        circuit = Circuit.from_dict(circuits["ft"].value["circuit"])
        # remote: no DCM, so no DCM-filtered head set; the whole-circuit set below still runs
        heads = paper_patch_heads(circuit, selections) if circuit.size and not remote else {}
        if not (any(heads.values()) or (remote and circuit.size)):
            return {"items": [], "heads": {}, "note": "no fine-tuned circuit heads to patch"}
        # the same usable-object filter as every other stage (objects and labels single tokens for both)
        pool, labels = usable_pool(model("base").tokenizer, 7)
        examples = generate(n_boxes=7, n=p.cmap_n, seed=seed, objects=pool, labels=labels)
        # the scores are computed at assembly from these items (metrics.cmap_scores), not stored here
        items = []
        # two head sets, labelled: the paper's DCM-filtered heads (its rule) and every head of the ft
        # circuit (output variant only), so a reader sees how much a conclusion depends on DCM
        whole = {g: tuple(tuple(h) for h in circuit.heads(g)) for g in sc.GROUPS}
        for label, hs, variants in (("dcm", heads, p.cmap_variants), ("circuit", whole, ("output",))):
            if not any(hs.values()):
                continue
            result = run_cmap(model("base").model, model("ft").model, model("base").tokenizer, hs, examples,
                              tokenizer_ft=model("ft").tokenizer, variants=variants, batch_size=p.batch_size,
                              base_name=ref["base"]["ref"], ft_name=ref["ft"]["ref"], progress=progress)
            rows = result.item_rows()
            if label != "dcm" and any(heads.values()):  # the unpatched base / ft rows are the same items: once
                rows = [r for r in rows if r["variant"] != "none"]
            items += [{**r, "heads": label} for r in rows]
        return {"items": items, "heads": {g: [list(h) for h in hs] for g, hs in heads.items()},
                "circuit_heads": {g: [list(h) for h in hs] for g, hs in whole.items()}}

    cmap = cache.schedule("cmap", lambda: {
        **common, **ref, "n": p.cmap_n, "variants": p.cmap_variants, "head_sets": ["dcm", "circuit"],
        "objects": "usable", "circuit_ft": circuit_key("ft"), "dcm_ft": config_hash(dcm_runs["ft"][0].value)},
        cmap_stage)

    # every result the scorecard reads, the other worker's waited for now (score-many's ft worker)
    circuit_results = resolved(circuits)
    card, items = assemble_scorecard(config, chash, cards.value, resolved(acc), circuit_results, resolved(faith),
                                     {w: [run.value for run in dcm_runs[w]] for w in SIDES}, cmap.value,
                                     resolved(semantics), seed, dtype, device, p.dcm_seeds)
    claim_outputs(out_dir, SCORE_DATA_OUTPUTS, SCORE_WRITER)
    path = sc.save(card, out_dir, items)
    for which in SIDES:
        atomic_write_json(out_dir / f"circuit_{which}.json", circuit_results[which]["circuit"])
    # this run's own cache only: a stage copied from another run is listed apart, as reused
    cached = sorted(set(_stage_names(p)) - set(cache.ran) - set(cache.reused))
    atomic_write_json(out_dir / "timings.json", {"computed_s": cache.timings, "peak_rss_mb": cache.peak_rss_mb,
                                                 "cached": cached, "reused_from_other_runs": sorted(cache.reused)})
    return ScoreRun(card, path, dict(cache.timings), cached, dict(cache.peak_rss_mb), items, sorted(cache.reused))


def stage_sources(dirs: Sequence[str | Path]) -> list[Path]:
    """The stage directories of ``reuse_stages`` (a run directory's ``stages/``, or the directory given),
    each checked to exist before any model loads."""
    sources = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise EtbenchError(f"--reuse-stages: {d} is not a directory")
        sources.append(d / "stages" if (d / "stages").is_dir() else d)
    return sources


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _stage_names(p: Preset) -> list[str]:
    names = ["models", "accuracy_base", "accuracy_ft", "circuit_base", "circuit_ft", "faithfulness_base",
             "faithfulness_ft", "semantics_base", "semantics_ft", "cmap"]
    return names + [f"dcm_{w}_seed{s}" for w in SIDES for s in p.dcm_seeds]


def _models_stage(model, p: Preset, identity: dict[str, Any]) -> dict[str, Any]:
    b, f = model("base"), model("ft")
    spec_b, spec_f = head_map(b.model).spec, head_map(f.model).spec
    check_compatible(b.model, f.model, b.tokenizer, f.tokenizer, generate(7, 7, seed=0))
    return {"base": asdict(model_card(b, spec_b, identity["base"])), "ft": asdict(model_card(f, spec_f, identity["ft"]))}


