"""``etbench score``: one run from a base/fine-tuned pair to a scorecard.

The stages are declared in ``etbench.scoring.graph`` (``etbench score --plan`` prints them): accuracy of both
models, a circuit for each (discovered or given), DCM on each model's own circuit, faithfulness of each
circuit on each model (the paper's Table 1 being the base circuit on the fine-tuned model), the semantics
check of the base's DCM heads on each model, and CMAP (the fine-tuned model's DCM-filtered circuit heads
patched into the base). Each is cached on disk under the hash of its inputs (``etbench.scoring.stages``).

The scorecard holds numbers only; wall times go to ``timings.json`` so that a resumed or repeated run
writes a byte-identical ``scorecard.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
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
    loads_json,
    refuse_foreign_files,
)
from etbench.mech.interventions import tallying
from etbench.mech.nnsight_backend import load_remote, ndif_api_key
from etbench.metrics.dcm import dcm_preset
from etbench.models.adapter import load_pair
from etbench.schema import scorecard as sc
from etbench.schema.circuit import load_circuit, paper_circuit
from etbench.scoring import graph
from etbench.scoring.assemble import assemble_scorecard, library_versions
from etbench.scoring.graph import REMOTE_DCM_NOTE, SIDES  # noqa: F401 - REMOTE_DCM_NOTE: read by callers here
from etbench.scoring.presets import DEFAULT_BASE, DEFAULT_FT, Preset, resolve_preset
from etbench.scoring.stages import StageCache, result_checksum


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
    passes: dict[str, dict[str, int]] = field(default_factory=dict)  # per computed stage (``PassTally.as_dict``)


def circuit_spec(given: str | None) -> tuple[str | None, str | None]:
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
    """Score ``ft`` against ``base``: every stage of ``graph.GRAPH`` in order, then the scorecard; writes
    ``scorecard.json`` (+ items, circuits, timings) to ``out_dir`` (``etbench.score`` also writes the report).

    ``dtype=None``: bfloat16 on CUDA, float32 on CPU. ``share_base_weights``: an unmerged adapter fine-tune
    and its base as one copy of the base weights. ``stage_plan``: this worker's share of the stages
    (``StageCache``'s ``plan``; ``scoring.distributed``); a worker whose share ends raises
    ``stages.StagesHandedOff``. ``remote``: every forward pass on NDIF (``check_remote``); DCM and the
    semantics check record ``REMOTE_DCM_NOTE``, so CMAP patches the whole fine-tuned circuit's heads.
    ``ndif_key``: default ``NDIF_API_KEY``, else ``nnsight login``'s. ``reuse_stages``: other runs'
    directories, read only: a stage stored there under this run's key is copied instead of computed."""
    p = resolve_preset(preset, discovery)
    if remote:
        check_remote(base, ft, circuit_base=circuit_base, circuit_ft=circuit_ft, dtype=dtype, device=device,
                     share_base_weights=share_base_weights, api_key=ndif_key)
        dtype, device = REMOTE_DTYPE, REMOTE_DEVICE
    dtype = models.default_dtype(device) if dtype is None else dtype
    identity = check_inputs(base, ft, out_dir, seed=seed, dtype=dtype, device=device, remote=remote)
    sources = stage_sources(reuse_stages)
    circuits = {"base": circuit_spec(circuit_base), "ft": circuit_spec(circuit_ft)}  # (to load, as recorded)
    config = run_config(p, identity, seed, dtype, {w: circuits[w][1] for w in SIDES}, remote)
    # what the scorecard's provenance says made its numbers, beyond the stage keys (and the base weights
    # shared with the adapter, ~1e-7 off in the logits): a stage of another run is taken only when the same
    made_with = {"etbench": __version__, "libraries": library_versions(), "device": device,
                 "shared_base_weights": bool(share_base_weights and models.shares_base(base, ft))}
    cache = StageCache(Path(out_dir) / "stages", plan=stage_plan, sources=sources, made_with=made_with)
    # Stages are keyed by the weights' revision, not only the name: new weights under an old alias recompute.
    ref = {w: {"ref": identity[w]["ref"], "revision": identity[w]["revision"]} for w in SIDES}
    common = {"benchmark_version": sc.BENCHMARK_VERSION, "seed": seed, "dtype": dtype, "batch_size": p.batch_size,
              **({"execution": REMOTE_DEVICE} if remote else {})}
    loader = PairLoader(base, ft, identity, dtype=dtype, device=device, share_base_weights=share_base_weights,
                        remote=remote, ndif_key=ndif_key, progress=progress)
    run = graph.PairRun(p, seed, common, ref, identity, loader.load, {w: circuits[w][0] for w in SIDES},
                        {w: circuits[w][1] for w in SIDES}, cache, remote=remote, progress=progress)
    with tallying():  # the run's own: a stage's repeated tokens are those any earlier stage of the run ran
        graph.schedule(run)
        card, items = assemble_scorecard(config, config_hash(config), *scorecard_inputs(run), seed, dtype, device,
                                         p.dcm_seeds, edges=edge_inputs(run))
    return write_outputs(Path(out_dir), run, card, items)


def run_config(p: Preset, identity: dict[str, Any], seed: int, dtype: str, recorded: dict[str, str | None],
               remote: bool) -> dict[str, Any]:
    """The scorecard's config (its hash names the run): the pair, seed, dtype, preset, circuits, DCM settings."""
    config = {"benchmark_version": sc.BENCHMARK_VERSION, "base": identity["base"]["ref"],
              "ft": identity["ft"]["ref"], "seed": seed, "dtype": dtype, "preset": asdict(p),
              "circuit_base": recorded["base"] or "discover", "circuit_ft": recorded["ft"] or "discover"}
    config["dcm"] = dcm_preset(p.dcm, seed=seed).to_dict()
    if remote:  # only then: a local run's config (and so its hash and cached stages) is unchanged
        config["execution"] = REMOTE_DEVICE
    return config


def scorecard_inputs(run: graph.PairRun) -> tuple[Any, ...]:
    """The results ``assemble_scorecard`` reads, in its argument order; under score-many the other worker's
    are waited for now, the circuits first (then the pair check, accuracy, faithfulness, DCM, CMAP, semantics)."""
    def sides(stage: str) -> dict[str, Any]:
        return {w: run.value(stage.format(w)) for w in SIDES}

    circuits = sides("circuit_{}")
    return (run.value("models"), sides("accuracy_{}"), circuits, sides("faithfulness_{}"),
            {w: [run.value(f"dcm_{w}_seed{s}") for s in run.preset.dcm_seeds] for w in SIDES}, run.value("cmap"),
            sides("semantics_{}"))


def edge_inputs(run: graph.PairRun) -> dict[str, Any] | None:
    """Both sides' edges stages, for a preset that scores edges (else None: no section)."""
    return {w: run.value(f"edges_{w}") for w in SIDES} if run.preset.edge_types else None


def write_outputs(out_dir: Path, run: graph.PairRun, card: sc.Scorecard, items: list[dict[str, Any]]) -> ScoreRun:
    """The scorecard, items, both circuits and ``timings.json`` (claimed in the manifest first)."""
    cache = run.cache
    claim_outputs(out_dir, SCORE_DATA_OUTPUTS, SCORE_WRITER)
    path = sc.save(card, out_dir, items)
    for which in SIDES:
        atomic_write_json(out_dir / f"circuit_{which}.json", run.value(f"circuit_{which}")["circuit"])
    # this run's own cache only: a stage copied from another run is listed apart, as reused
    cached = sorted(set(graph.stage_names(run.preset)) - set(cache.ran) - set(cache.reused))
    # passes: each computed stage's token positions (forward, backward, and forward ones repeating an unpatched
    # row an earlier stage of this process ran: mech.interventions.PassTally); a stage's parts are in it too
    atomic_write_json(out_dir / "timings.json", {"computed_s": cache.timings, "peak_rss_mb": cache.peak_rss_mb,
                                                 "passes": cache.passes, "cached": cached,
                                                 "reused_from_other_runs": sorted(cache.reused)})
    return ScoreRun(card, path, dict(cache.timings), cached, dict(cache.peak_rss_mb), items, sorted(cache.reused),
                    dict(cache.passes))


class PairLoader:
    """The pair's models, each loaded on first use (a fully cached run, a resume after the last stage, never
    loads them): locally, as one copy of the base weights when asked, or as NDIF skeletons (``remote``)."""

    def __init__(self, base: str, ft: str, identity: dict[str, Any], *, dtype: str, device: str,
                 share_base_weights: bool, remote: bool, ndif_key: str | None, progress: bool) -> None:
        self.refs, self.identity = {"base": base, "ft": ft}, identity
        self.dtype, self.device, self.share_base_weights = dtype, device, share_base_weights
        self.remote, self.ndif_key, self.progress = remote, ndif_key, progress
        self.loaded: dict[str, Any] = {}

    def load(self, which: str):
        if which in self.loaded:
            return self.loaded[which]
        base, ft, identity = self.refs["base"], self.refs["ft"], self.identity
        if self.remote:
            spec = check_remote_model(f"--{which}", self.refs[which])
            self.loaded[which] = load_remote(identity[which]["ref"], spec.location, revision=spec.revision,
                                             api_key=self.ndif_key)
            return self.loaded[which]
        report = _stderr if self.progress else None
        # One copy of the base weights for an unmerged adapter on this base (7B memory), when asked for: the
        # base then runs with the adapter switched off, equal to a separate copy only to ~1e-7 in the logits
        # (measured), so the default keeps two copies and byte-reproducible scorecards.
        if self.share_base_weights and models.shares_base(base, ft):
            pair = load_pair(base, ft, dtype=self.dtype, device=self.device, report=report)
            self.loaded["base"], self.loaded["ft"] = (replace(m, ref=identity[w]["ref"]) for m, w in zip(pair, SIDES))
        else:
            # named by the published ref: model names reach per-item rows, which are published
            self.loaded[which] = replace(models.load(self.refs[which], dtype=self.dtype, device=self.device,
                                                     report=report), ref=identity[which]["ref"])
        return self.loaded[which]


def holds_stages(directory: Path) -> bool:
    """``directory`` holds a stage result as ``StageCache`` stores one: a JSON object with its key, and its result
    under a matching checksum (another file there is never served as a stage)."""
    for path in sorted(directory.glob("*.json")):
        try:
            record = loads_json(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(record, dict) and "key" in record and "result" in record \
                and record.get("checksum") == result_checksum(record["result"]):
            return True
    return False


def stage_sources(dirs: Sequence[str | Path]) -> list[Path]:
    """The stage directories of ``reuse_stages`` (a run directory's ``stages/``, or the directory given),
    each checked to exist and hold stage files before any model loads (an empty or mistyped one reused
    nothing, silently)."""
    sources = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise EtbenchError(f"--reuse-stages: {d} is not a directory")
        source = d / "stages" if (d / "stages").is_dir() else d
        if not holds_stages(source):
            raise EtbenchError(f"--reuse-stages: {source} holds no stage files (give an earlier `etbench score` "
                               "run's --out directory, or its stages/ directory)")
        sources.append(source)
    return sources


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
