"""The scorecard pipeline as a declared stage graph.

Each stage is a small function of the run (``PairRun``) and, for a per-side stage, the side it runs on; its
declaration (``Stage``) says, as data, what keys its stored result (``stages.StageCache``): the preset
fields and constants it reads, the upstream stages whose results it reads (each hashed into the key), and
whose model it runs (one side's, or both: a pair stage). ``instances`` expands the graph into the concrete
stages of a preset in the order ``etbench score`` runs them; ``schedule`` runs them through a cache (under
``etbench score-many`` a worker's plan computes its own and defers the other side's); ``format_plan`` prints
it (``etbench score --plan``).

The order is the pipeline's: DCM comes before faithfulness because it needs only its own model's circuit,
so under ``score-many`` a side runs it while the other side's circuit, which faithfulness needs, may still
be in progress. Stage keys are exactly those of the pipeline before it was declared as a graph, so stages
stored by earlier runs are read back and scorecards stay byte-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from etbench.core.io import config_hash, jsonable
from etbench.core.stats import mib_ci, mib_normalised
from etbench.mech.heads import head_map
from etbench.metrics.ablation import MeanActivations, mean_activations
from etbench.metrics.accuracy import run as accuracy_run
from etbench.metrics.cmap import check_compatible, paper_patch_heads, run_cmap_sets
from etbench.metrics.dcm import dcm_preset, semantics_check, train_masks
from etbench.metrics.discovery import discover
from etbench.metrics.edges import EDGE_BATCH_SIZE, EDGE_BOXES, default_node_k, edge_nodes, edge_scores
from etbench.metrics.faithfulness import evaluate_circuit, evaluation_runner
from etbench.metrics.sizing import ceilings
from etbench.schema import scorecard as sc
from etbench.schema.circuit import Circuit, load_circuit
from etbench.scoring.assemble import model_card
from etbench.scoring.presets import Preset
from etbench.scoring.stages import Deferred, StageCache
from etbench.task.layout import usable_pool
from etbench.task.prompts import generate

#: The two models of a pair, in the order their stages and rows are always listed.
SIDES = ("base", "ft")
#: A stage that runs both models (the pair check, CMAP); under score-many the ft side runs it (it loads both).
PAIR = "pair"

#: The note a remote run's DCM and semantics stages record instead of results.
REMOTE_DCM_NOTE = ("not run: --remote (DCM trains masks by gradient descent, hundreds of passes with "
                   "gradients; NDIF runs etbench's forward passes only)")


@dataclass
class PairRun:
    """What every stage of one pair's run reads: the preset and seed, the keys' common part, each model's
    published identity, a lazy model loader, the given circuits, and the results of the stages scheduled
    so far (``value``)."""

    preset: Preset
    seed: int
    common: dict[str, Any]  # in every stage's key: benchmark version, seed, dtype, batch size (+ execution)
    ref: dict[str, dict[str, Any]]  # side -> {"ref", "revision"}: the model in a per-side stage's key
    identity: dict[str, dict[str, Any]]  # side -> published identity (model cards)
    load: Callable[[str], Any]  # side -> loaded model (``models.Loaded``), loaded on first use
    given: dict[str, str | None]  # side -> circuit to load instead of discovering
    recorded: dict[str, str | None]  # side -> how the config records the given circuit
    cache: StageCache  # the stages' store (a stage storing parts of its own writes them there)
    remote: bool = False
    progress: bool = True
    results: dict[str, Deferred] = field(default_factory=dict)
    means: dict[str, MeanActivations] = field(default_factory=dict)

    def value(self, name: str) -> Any:
        return self.results[name].value

    def mean(self, side: str) -> MeanActivations:
        """The side's mean activations (7 boxes, the preset's ``mean_n`` prompts, the run's seed): the circuit's
        sizing and the faithfulness stage ablate with the same mean, so it is computed once per process
        (twice, it cost 26,500 token positions per side under ``standard``). Not a stage: a few MB of tensors,
        recomputed when a resumed run needs it."""
        if side not in self.means:
            m, p = self.load(side), self.preset
            pool, labels = usable_pool(m.tokenizer, 7)
            self.means[side] = mean_activations(m.model, m.tokenizer, head_map(m.model), 7, p.mean_n, self.seed,
                                                p.batch_size, pool, labels, progress=self.progress)
        return self.means[side]

    def circuit_key(self, side: str) -> str:
        return circuit_digest(self.value(f"circuit_{side}")["circuit"])


def circuit_digest(circuit: dict[str, Any]) -> str:
    """The hash a downstream stage keys a circuit by: its content without ``stats`` (the discovery's passes and
    wall seconds). With them in, a circuit recomputed identically (a resumed or re-run circuit stage) changed
    every DCM, faithfulness, semantics and CMAP key by its timing alone, and nothing downstream was reused."""
    return config_hash({k: v for k, v in circuit.items() if k != "stats"})


@dataclass(frozen=True)
class Stage:
    """One stage of the graph. ``name``: its stored name, ``{side}`` and ``{seed}`` marking the per-side and
    per-DCM-seed instances. ``side``: ``"each"`` (one instance per side, running that side's model) or
    ``PAIR``. Its key (``depends``): the common part, the model(s), ``settings`` ((key, preset field)),
    ``constants``, ``upstream`` ((key, stage name, part of its result or None for all), the result's hash;
    a key ``"a/b"`` nests) and ``derived`` (inputs computed from the preset). ``parts``: sub-stages it
    stores on its own (each keyed inside ``compute``)."""

    name: str
    side: str
    compute: Callable[[PairRun, "Instance"], Any]
    settings: tuple[tuple[str, str], ...] = ()
    constants: tuple[tuple[str, Any], ...] = ()
    upstream: tuple[tuple[str, str, str | None], ...] = ()
    derived: Callable[[PairRun, "Instance"], dict[str, Any]] | None = None
    parts: tuple[str, ...] = ()
    per_seed: bool = False
    what: str = ""
    when: Callable[[Preset], bool] | None = None  # None: every preset runs it




@dataclass(frozen=True)
class Instance:
    """A stage of one side (None: a pair stage) and one DCM seed (None: not per seed)."""

    stage: Stage
    side: str | None
    seed: int | None

    def format(self, template: str, preset: Preset) -> str:
        return template.format(side=self.side, seed=self.seed, seed0=preset.dcm_seeds[0])

    def name(self, preset: Preset) -> str:
        return self.format(self.stage.name, preset)

    def worker(self) -> str:
        """The score-many side that computes it: its own side's; a pair stage the ft side's."""
        return self.side or "ft"


def instances(preset: Preset) -> list[Instance]:
    """Every stage of a run of ``preset``, in the order ``etbench score`` runs them (base before ft)."""
    out = []
    for stage in GRAPH:
        if stage.when is not None and not stage.when(preset):
            continue
        for side in (SIDES if stage.side == "each" else (None,)):
            for seed in (preset.dcm_seeds if stage.per_seed else (None,)):
                out.append(Instance(stage, side, seed))
    return out


def stage_names(preset: Preset) -> list[str]:
    return [inst.name(preset) for inst in instances(preset)]


def depends(run: PairRun, inst: Instance) -> dict[str, Any]:
    """Stage ``inst``'s key inputs, as its declaration lists them (reads the upstream results)."""
    stage, p = inst.stage, run.preset
    key: dict[str, Any] = dict(run.common)
    if inst.side is None:
        key.update(run.ref)
    else:
        key["model"] = run.ref[inst.side]
    key.update({k: getattr(p, f) for k, f in stage.settings})
    key.update(stage.constants)
    for k, upstream, part in stage.upstream:
        value = run.value(inst.format(upstream, p))
        outer, _, inner = k.partition("/")
        digest = (circuit_digest(value[part]) if part == "circuit" else
                  config_hash(value if part is None else value[part]))
        if inner:
            key.setdefault(outer, {})[inner] = digest
        else:
            key[k] = digest
    if stage.derived is not None:
        key.update(stage.derived(run, inst))
    return key


def schedule(run: PairRun) -> None:
    """Every stage, in order, through ``run.cache.schedule`` (computed now, read from disk, or deferred to
    the other worker by its plan); the results go to ``run.results``."""
    for inst in instances(run.preset):
        run.results[inst.name(run.preset)] = run.cache.schedule(
            inst.name(run.preset), lambda inst=inst: depends(run, inst), lambda inst=inst: inst.stage.compute(run, inst))


# ---------------------------------------------------------------------------------------------- the stages


def models_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    # Fail fast on anything missing or incompatible before hours of work: both models must load (one clear
    # line otherwise) and share heads and tokenizer.
    b, f = run.load("base"), run.load("ft")
    spec_b, spec_f = head_map(b.model).spec, head_map(f.model).spec
    check_compatible(b.model, f.model, b.tokenizer, f.tokenizer, generate(7, 7, seed=0))
    return {"base": asdict(model_card(b, spec_b, run.identity["base"])),
            "ft": asdict(model_card(f, spec_f, run.identity["ft"]))}


def accuracy_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    p, m = run.preset, run.load(inst.side)
    r = accuracy_run(m.ref, n_boxes=p.accuracy_boxes, n=p.accuracy_n, seed=run.seed, batch_size=p.batch_size,
                     progress=run.progress, loaded=m)
    return {"summaries": [x.summary() for x in r.results], "vocabulary_note": r.vocabulary_note,
            "items": [{"measure": "accuracy", "model": inst.side, "n_boxes": x.n_boxes, "item": it.index,
                       "correct": it.correct} for x in r.results for it in x.items]}


def discovery_settings(p: Preset) -> dict[str, Any]:
    settings = {"mode": p.discovery_mode, "n": p.discovery_n, "minimality_n": p.minimality_n, "mean_n": p.mean_n,
                "minimality": p.minimality, "size": p.circuit_size, "target_fraction": p.target_fraction,
                "sizing_n": p.sizing_n}
    if p.circuit_size == "faithfulness":  # a circuit cached under an earlier growth rule is a different circuit
        settings["growth"] = "scaled-shape, magnitude order"
        settings["sizing_items"] = True  # stored before the per-prompt sizing rows were kept: recompute
    return settings


def circuit_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    p, given = run.preset, run.given[inst.side]
    if given is not None:
        return {"circuit": load_circuit(given).to_dict(), "method": "given", "forward_passes": {}}
    m = run.load(inst.side)
    res = discover(m, mode=p.discovery_mode, n=p.discovery_n, seed=run.seed, batch_size=p.batch_size,
                   minimality_mode=p.minimality, minimality_n=p.minimality_n, mean_n=p.mean_n,
                   size=p.circuit_size, target_fraction=p.target_fraction, sizing_n=p.sizing_n,
                   model_name=m.ref, progress=run.progress, mean=lambda: run.mean(inst.side))
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


def circuit_inputs(run: PairRun, inst: Instance) -> dict[str, Any]:
    """the given circuit, else the discovery settings"""
    return {"given": run.recorded[inst.side],
            "discovery": None if run.given[inst.side] else discovery_settings(run.preset)}


def dcm_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    if run.remote:
        return {"scores": [], "items": [], "selections": [], "note": REMOTE_DCM_NOTE}
    p, side = run.preset, inst.side
    circuit = Circuit.from_dict(run.value(f"circuit_{side}")["circuit"])
    if not circuit.size:  # e.g. a model at chance: discovery kept no head, there is nothing to mask
        return {"scores": [], "items": [], "selections": [], "note": "empty circuit: DCM not run"}
    groups = [g for g in p.dcm_groups if circuit.heads(g)]
    if not groups:
        return {"scores": [], "items": [], "selections": [], "note": "no DCM group has heads"}
    m = run.load(side)
    result = train_masks(m.model, m.tokenizer, circuit, dcm_preset(p.dcm, seed=inst.seed), groups=groups,
                         model_name=m.ref, progress=run.progress)
    return {"scores": [asdict(s) for s in result.scores(side)], "items": result.item_rows(side),
            "selections": [[g, d, [list(h) for h in hs]] for (g, d), hs in result.selections().items()]}


def dcm_inputs(run: PairRun, inst: Instance) -> dict[str, Any]:
    """the DCM preset's settings under this seed"""
    return {"dcm": dcm_preset(run.preset.dcm, seed=inst.seed).to_dict()}


def faithfulness_part_inputs(run: PairRun, side: str) -> dict[str, Any]:
    """The key of the faithfulness parts (the ceilings; one circuit's evaluation adds the circuit): the model
    and the sizes; results without the ceilings' (and random circuits') per-item flags cannot be submitted,
    so those are keyed."""
    p = run.preset
    return {**run.common, "model": run.ref[side], "n": p.faithfulness_n, "mean_n": p.mean_n,
            "random_draws": p.random_draws, "ceiling_items": True, "random_items": True}


def faithfulness_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    p, which, seed = run.preset, inst.side, run.seed
    m = run.load(which)
    cache = run.cache
    # one runner for both circuits (the model's flags and the stored base runs are shared), built on first
    # need: a stage whose parts are all stored already (a second fine-tune of this base) never computes the
    # mean activations
    runner = Deferred(lambda: evaluation_runner(m.model, m.tokenizer, 7, p.faithfulness_n, seed, p.mean_n,
                                                p.batch_size, mean=run.mean(which), progress=run.progress))
    shared = faithfulness_part_inputs(run, which)

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

    # Parts, each stored on its own: the model's ceilings and each circuit's evaluation on it depend on that
    # model and circuit only, so every further fine-tune of one base recomputes on the base model just its
    # own circuit (the base circuit's evaluation with completeness is the larger part)
    ceil = cache.run(f"faithfulness_{which}_ceilings", shared, ceilings_part, follow_plan=False)
    out = {"ceilings": ceil}
    for name in SIDES:
        circ = Circuit.from_dict(run.value(f"circuit_{name}")["circuit"])
        own = name == which

        def circuit_part(circ=circ, own=own):
            # curve=False: the scorecard's record of a circuit over size is the circuit stage's sizing curve;
            # this one (the own circuit's ranking cut on a log grid: 7 of its 28 evaluations in a
            # quick-preset run) reached no scorecard field
            return evaluate_circuit(m.model, circ, m.tokenizer, n_boxes=7, n=p.faithfulness_n, seed=seed,
                                    mean_n=p.mean_n, batch_size=p.batch_size, random_draws=p.random_draws,
                                    completeness_draws=p.completeness_draws if own else 0, curve=False,
                                    model_name=m.ref, progress=run.progress, runner=runner.value).to_dict()

        ev = cache.run(f"faithfulness_{which}_of_{name}",
                       {**shared, "circuit": run.circuit_key(name),
                        "completeness_draws": p.completeness_draws if own else 0},
                       circuit_part, follow_plan=False)
        ev["mib"] = mib_normalised(ev["circuit_acc"]["value"], ev["model_acc"]["value"], ceil["no_heads"]["value"])
        ev["mib_ci"] = list(mib_ci(ev["circuit_correct"], ev["model_correct"], ceil["items"]["no_heads"], seed))
        out[name] = ev
    return out


def semantics_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    if run.remote:
        return {"results": [], "note": REMOTE_DCM_NOTE}
    p, seed = run.preset, run.seed
    cfg = dcm_preset(p.dcm, seed=seed)
    first = inst.format("dcm_base_seed{seed0}", p)
    selections = {(g, d): [tuple(h) for h in hs] for g, d, hs in run.value(first)["selections"]}
    if not selections:
        return {"results": [], "note": "the base circuit has no DCM masks"}
    m = run.load(inst.side)
    results = semantics_check(m.model, m.tokenizer, selections, n=cfg.semantics_n, repeats=cfg.semantics_repeats,
                              seed=seed, batch_size=p.batch_size, model_name=m.ref, progress=run.progress,
                              sources=cfg.sources)
    return {"results": [{"group": r.group, "desideratum": r.desideratum, "heads": [list(h) for h in r.heads],
                         "accuracies": list(r.accuracies), "n": r.n, "correct": [list(c) for c in r.correct]}
                        for r in results]}


def semantics_inputs(run: PairRun, inst: Instance) -> dict[str, Any]:
    """the DCM preset's semantics n, repeats and (unless fresh) where the sources come from"""
    cfg = dcm_preset(run.preset.dcm)
    # fresh sources are left out of the key: the stages stored before the field existed used them
    sources = {} if cfg.sources == "fresh" else {"sources": cfg.sources}
    return {"n": cfg.semantics_n, "repeats": cfg.semantics_repeats, **sources}


def cmap_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    p, remote = run.preset, run.remote
    first = inst.format("dcm_ft_seed{seed0}", p)
    selections = {(g, d): [tuple(h) for h in hs] for g, d, hs in run.value(first)["selections"]}
    circuit = Circuit.from_dict(run.value("circuit_ft")["circuit"])
    # remote: no DCM, so no DCM-filtered head set; the whole-circuit set below still runs
    heads = paper_patch_heads(circuit, selections) if circuit.size and not remote else {}
    if not (any(heads.values()) or (remote and circuit.size)):
        return {"items": [], "heads": {}, "note": "no fine-tuned circuit heads to patch"}
    base, ft = run.load("base"), run.load("ft")
    # the same usable-object filter as every other stage (objects and labels single tokens for both)
    pool, labels = usable_pool(base.tokenizer, 7)
    examples = generate(n_boxes=7, n=p.cmap_n, seed=run.seed, objects=pool, labels=labels)
    # the scores are computed at assembly from these items (metrics.cmap_scores), not stored here
    # two head sets, labelled: the paper's DCM-filtered heads (its rule) and every head of the ft circuit
    # (output variant only), so a reader sees how much a conclusion depends on DCM; one call, so each prompt
    # runs once per model for both
    whole = {g: tuple(tuple(h) for h in circuit.heads(g)) for g in sc.GROUPS}
    sets = {label: (hs, variants) for label, hs, variants in (("dcm", heads, p.cmap_variants),
                                                              ("circuit", whole, ("output",))) if any(hs.values())}
    results = run_cmap_sets(base.model, ft.model, base.tokenizer, sets, examples, tokenizer_ft=ft.tokenizer,
                            batch_size=p.batch_size, base_name=run.ref["base"]["ref"], ft_name=run.ref["ft"]["ref"],
                            progress=run.progress)
    items = []
    for label, result in results.items():
        rows = result.item_rows()
        if label != "dcm" and "dcm" in results:  # the unpatched base / ft rows are the same items: once
            rows = [r for r in rows if r["variant"] != "none"]
        items += [{**r, "heads": label} for r in rows]
    return {"items": items, "heads": {g: [list(h) for h in hs] for g, hs in heads.items()},
            "circuit_heads": {g: [list(h) for h in hs] for g, hs in whole.items()}}


def edge_node_set(run: PairRun) -> dict[str, list[list[int]]]:
    """The edges' node set: each group's top heads of both circuits (``metrics.edges.edge_nodes``, the default k)."""
    circuits = [Circuit.from_dict(run.value(f"circuit_{w}")["circuit"]) for w in SIDES]
    return {g: [list(h) for h in hs] for g, hs in edge_nodes(*circuits).items()}


def edges_inputs(run: PairRun, inst: Instance) -> dict[str, Any]:
    """the node set of both circuits"""
    return {"nodes": edge_node_set(run)}


def edges_stage(run: PairRun, inst: Instance) -> dict[str, Any]:
    p, m = run.preset, run.load(inst.side)
    # the effects are stored per prompt; the comparison (and its CIs) is computed at assembly, as CMAP's scores
    scores = edge_scores(m.model, edge_node_set(run), m.tokenizer, n_boxes=EDGE_BOXES, n=p.edge_n, seed=run.seed,
                         batch_size=EDGE_BATCH_SIZE, types=list(p.edge_types), model_name=m.ref,
                         progress=run.progress)
    return {"scores": scores.to_dict(), "node_k": default_node_k(Circuit.from_dict(run.value("circuit_base")["circuit"]))}


#: The graph, in run order. A stage's key inputs are declared here; changing one changes the stage's key
#: (and so recomputes it and every stage downstream), so these are the keys stored runs were made under.
GRAPH: tuple[Stage, ...] = (
    Stage("models", PAIR, models_stage, what="load both models, check they share heads and tokenizer"),
    Stage("accuracy_{side}", "each", accuracy_stage, settings=(("n", "accuracy_n"), ("boxes", "accuracy_boxes")),
          what="next-token accuracy at each box count"),
    Stage("circuit_{side}", "each", circuit_stage, derived=circuit_inputs,
          what="the circuit: discovered (fast or exact) or given"),
    Stage("dcm_{side}_seed{seed}", "each", dcm_stage, per_seed=True, settings=(("groups", "dcm_groups"),),
          upstream=(("circuit", "circuit_{side}", "circuit"),),
          derived=dcm_inputs,
          what="DCM masks on the side's own circuit, one DCM seed"),
    Stage("faithfulness_{side}", "each", faithfulness_stage,
          settings=(("n", "faithfulness_n"), ("mean_n", "mean_n"), ("random_draws", "random_draws"),
                    ("completeness_draws", "completeness_draws")),
          constants=(("ceiling_items", True), ("random_items", True)),
          upstream=(("circuits/base", "circuit_base", "circuit"), ("circuits/ft", "circuit_ft", "circuit")),
          parts=("faithfulness_{side}_ceilings", "faithfulness_{side}_of_base", "faithfulness_{side}_of_ft"),
          what="both circuits mean-ablated on the side's model, with its ceilings"),
    Stage("semantics_{side}", "each", semantics_stage, derived=semantics_inputs, constants=(("repeat_items", True),),
          upstream=(("dcm_base", "dcm_base_seed{seed0}", None),),
          what="the base's DCM heads patched into the side's model"),
    # per side (each worker of score-many scores its own model's edges; both read both circuits' node set); before
    # CMAP, the graph's last stage, where score-many's base side hands off
    Stage("edges_{side}", "each", edges_stage, settings=(("n", "edge_n"), ("types", "edge_types")),
          constants=(("boxes", EDGE_BOXES), ("edge_batch", EDGE_BATCH_SIZE)), derived=edges_inputs,
          when=lambda p: bool(p.edge_types),
          what="path-patching score of every edge between the node set, per prompt (presets with edge types)"),
    Stage("cmap", PAIR, cmap_stage,
          settings=(("n", "cmap_n"), ("variants", "cmap_variants")),
          constants=(("head_sets", ["dcm", "circuit"]), ("objects", "usable")),
          upstream=(("circuit_ft", "circuit_ft", "circuit"), ("dcm_ft", "dcm_ft_seed{seed0}", None)),
          what="the ft's DCM-filtered circuit heads patched into the base"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{side\}", "(?P<side>base|ft)").replace(r"\{seed\}", r"\d+")
                      + "$")


_WORKER_PATTERNS = [(_pattern(t), s.side) for s in GRAPH for t in (s.name, *s.parts)]


def worker_of(name: str) -> str:
    """The score-many side that computes stage (or part) ``name``: a per-side stage's own side (a part
    belongs to its stage), a pair stage the ft side's (it holds both models)."""
    for pattern, side in _WORKER_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group("side") if side == "each" else "ft"
    raise ValueError(f"not a stage of the scoring graph: {name!r}")


def format_plan(preset: Preset) -> str:
    """The graph of a run of ``preset``, one stage a line: the stage, the score-many side computing it, the
    stages it reads and its key inputs (preset fields with their values)."""
    rows = [("stage", "side", "reads", "key inputs (beside model, seed, dtype, batch size)")]
    for inst in instances(preset):
        s = inst.stage
        reads = [inst.format(u, preset) for _, u, _ in s.upstream] or ["-"]
        keyed = [f"{k}={f}:{_short(getattr(preset, f))}" for k, f in s.settings]
        keyed += [f"{k}={_short(v)}" for k, v in s.constants]
        if s.derived is not None:
            keyed.append(f"+ {s.derived.__doc__}")
        rows.append((inst.name(preset), inst.worker() if s.side == "each" else f"{PAIR} ({inst.worker()})",
                     ", ".join(dict.fromkeys(reads)), " ".join(keyed) or "-"))
        for part in s.parts:
            rows.append(("  " + inst.format(part, preset), inst.worker(), "(part, stored on its own)", ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"preset {preset.name}: {len(instances(preset))} stages, in run order"]
    lines += ["  ".join(r[i].ljust(width[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines += ["", "what each stage does:"] + [f"  {s.name}: {s.what}" for s in GRAPH]
    return "\n".join(line.rstrip() for line in lines)


def _short(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)
