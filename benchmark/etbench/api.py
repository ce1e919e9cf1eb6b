"""The public Python API: what ``import etbench`` exposes and what every ``etbench`` command calls.

A notebook user and the CLI go through the same functions::

    import etbench
    run = etbench.score("tiny-base", "tiny-ft", out_dir="etbench-out")   # scorecard + report
    card = etbench.Scorecard.load("etbench-out/scorecard.json")
    comparison = etbench.compare("tiny-base", "tiny-ft")                  # paired statistics
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from etbench.core.errors import EtbenchError
from etbench.metrics.robustness import write as write_robustness
from etbench.publish import report
from etbench.publish.leaderboard import locked
from etbench.scoring.presets import DEFAULT_BASE, DEFAULT_FT, Preset

if TYPE_CHECKING:  # the running modules import torch; compare() and the CLI's publishing commands must not
    from etbench.metrics.accuracy import AccuracyRun
    from etbench.scoring.pipeline import ScoreRun

#: Where ``compare`` looks for scorecards given by name: the submission store and ``score``'s default output.
DEFAULT_STORES: tuple[Path, ...] = (Path("submissions/results"), Path("etbench-out"))


def score(base: str = DEFAULT_BASE, ft: str = DEFAULT_FT, out_dir: str | Path = "etbench-out", *,
          preset: str | Preset = "quick", discovery: str | None = None, seed: int = 0,
          circuit_base: str | None = None, circuit_ft: str | None = None, dtype: str | None = None,
          device: str = "cpu", progress: bool = True, backend: str = "hooks",
          share_base_weights: bool = False, remote: bool = False,
          reuse_stages: Sequence[str | Path] = ()) -> ScoreRun:
    """Score ``ft`` against ``base`` and write ``scorecard.json``, ``items.jsonl``, the two circuits,
    ``timings.json`` and ``report.md``/``report.html`` to ``out_dir`` (stages cached in ``out_dir/stages``,
    so an interrupted run resumes). Returns the run (``.card`` is the ``Scorecard``).
    ``dtype=None``: bfloat16 on CUDA, float32 on CPU. ``backend``: ``hooks`` (torch hooks) or ``nnsight``
    (the same edits through nnsight traces; equal results, tests/model/test_nnsight_backend.py).
    ``share_base_weights``: an unmerged adapter fine-tune and its base share one copy of the base weights
    (half the memory for a 7B LoRA pair; the base's logits then differ from a separate copy by ~1e-7).
    ``remote`` (with ``backend="nnsight"``): hub models hosted on NDIF, run there (NDIF_API_KEY or
    ``nnsight login``); both circuits must be given, DCM is not run (``pipeline.check_remote``).
    ``reuse_stages``: earlier runs' directories whose stages under the same inputs are copied instead of
    computed (e.g. the base side, when scoring another fine-tune of a base scored before)."""
    from etbench.mech.interventions import forward_backend  # torch: imported only when a model is run
    from etbench.scoring import pipeline

    check_backend(backend, remote)
    if backend == "nnsight":
        from etbench.mech import nnsight_backend  # nnsight: imported only when asked for
    with forward_backend(nnsight_backend.run) if backend == "nnsight" else nullcontext():
        run = pipeline.score(base, ft, out_dir, preset=preset, discovery=discovery, seed=seed,
                             circuit_base=circuit_base, circuit_ft=circuit_ft, dtype=dtype, device=device,
                             progress=progress, share_base_weights=share_base_weights, remote=remote,
                             reuse_stages=reuse_stages)
    _write_score_report(run.card, run.items, out_dir)
    return run


def _write_score_report(card, items, out_dir: str | Path) -> None:
    """A scored pair's report beside its scorecard, claimed in the score manifest just before it is written
    (not earlier: a report that is never written must not be claimed, or a user's file of its name would be
    replaced later)."""
    # the pipeline imports torch, loaded by now: a pair was just scored
    from etbench.core.io import claim_outputs
    from etbench.scoring.pipeline import SCORE_REPORT_OUTPUTS, SCORE_REPORT_STEM, SCORE_WRITER

    claim_outputs(Path(out_dir), SCORE_REPORT_OUTPUTS, SCORE_WRITER)
    report.write_doc(report.scorecard_report(card, items), Path(out_dir), stem=SCORE_REPORT_STEM)


def score_plan(preset: str | Preset = "quick", discovery: str | None = None) -> str:
    """The stage graph ``score`` runs under ``preset`` (``etbench score --plan``): each stage, the score-many
    side that computes it, the stages it reads and its key inputs. Nothing is loaded or written."""
    from etbench.scoring import graph  # torch: imported only when asked for
    from etbench.scoring.presets import resolve_preset

    return graph.format_plan(resolve_preset(preset, discovery))


def score_many(jobs, **kwargs):
    """Score several pairs (``scoring.distributed.PairJob``s) on Ray, each pair's base-side and ft-side
    stages as concurrent tasks, and write each pair's report; keyword arguments as
    ``scoring.distributed.score_many`` (``address`` = ``auto``/``HOST:PORT`` of a cluster, else a local
    Ray). The files per pair are those of ``score``, byte for byte."""
    from etbench.schema import scorecard as sc
    from etbench.scoring import distributed  # ray: imported only when asked for

    results = distributed.score_many(jobs, **kwargs)
    for r in results:
        card = sc.load(r.scorecard)
        _write_score_report(card, sc.load_items(r.scorecard, card), r.job.out_dir)
    return results


def compare(a: str, b: str, store: Sequence[str | Path] = DEFAULT_STORES,
            correction: str = "holm") -> report.Comparison:
    """Paired statistics of two scorecards on the same items (McNemar, paired bootstrap CIs, ``correction``
    for multiple comparisons). ``a``/``b``: a scorecard path, a stored submission name or a model ref."""
    return report.with_correction(report.resolve_pair(a, b, [Path(s) for s in store]), correction)


def check_backend(backend: str, remote: bool) -> None:
    """``backend`` is one etbench has, and ``remote`` goes with nnsight (before anything is loaded)."""
    if backend not in ("hooks", "nnsight"):
        raise EtbenchError(f"backend must be hooks or nnsight, got {backend!r}")
    if remote and backend != "nnsight":
        raise EtbenchError("--remote runs the edits as nnsight traces on NDIF: add --backend nnsight")


def accuracy(model: str, n_boxes: Sequence[int] = (7,), n: int | None = None, seed: int | None = None,
             backend: str = "hooks", remote: bool = False, **kwargs) -> AccuracyRun:
    """Full-model accuracy (greedy top-1 over the whole vocabulary) with 95% Wilson CIs. ``backend`` and
    ``remote`` as for ``score`` (remote: a hub model hosted on NDIF; ``dtype``/``device`` do not apply)."""
    from etbench.mech.interventions import forward_backend  # torch: imported only when a model is run
    from etbench.metrics.accuracy import run

    check_backend(backend, remote)
    if backend == "nnsight":
        from etbench.mech import nnsight_backend  # nnsight: imported only when asked for
    if remote:
        from etbench.scoring.pipeline import check_no_local_options, check_remote_model

        check_no_local_options({"--dtype": kwargs.get("dtype") is not None,
                                "--device": kwargs.get("device", "cpu") != "cpu"})
        spec = check_remote_model("--model", model)
        nnsight_backend.ndif_api_key()
        kwargs["loaded"] = nnsight_backend.load_remote(model, spec.location, revision=spec.revision)
    with forward_backend(nnsight_backend.run) if backend == "nnsight" else nullcontext():
        return run(model, n_boxes=n_boxes, n=n, seed=seed, **kwargs)


def robustness_directory(row: str | Path, store: str | Path = DEFAULT_STORES[0]) -> Path:
    """A row's directory: ``row`` itself when it holds a ``scorecard.json``, else ``store/row``."""
    for candidate in (Path(row), Path(store) / str(row)):
        if (candidate / "scorecard.json").is_file():
            return candidate
    raise EtbenchError(f"{row}: neither a directory holding scorecard.json nor a row of {store}")


def robustness(rows: Sequence[str | Path], store: str | Path = DEFAULT_STORES[0], *, n: int | None = None,
               mean_n: int | None = None, diff_n: int | None = None, batch_size: int = 16, progress: bool = True,
               status=lambda line: None) -> list[Path]:
    """Measure and write each row's ``robustness.json`` beside its scorecard (docs/method.md §14-15): its models
    and committed circuits in every wording, and the diffing view of the pair. Every row is checked before a
    model loads; rows of one base share the base side. ``n``/``mean_n``/``diff_n``: items per wording, mean
    ablation prompts per wording, diffing prompts (default: ``robustness_run``'s)."""
    from etbench.metrics import robustness_run  # torch: imported only when a model is run

    # "is None", not "or": an explicit 0 is refused by check_sizes, not replaced by the default
    sizes = dict(n=robustness_run.DEFAULT_N if n is None else n,
                 mean_n=robustness_run.DEFAULT_MEAN_N if mean_n is None else mean_n,
                 diff_n=robustness_run.DEFAULT_DIFF_N if diff_n is None else diff_n)
    robustness_run.check_sizes(**sizes)
    dirs = list(dict.fromkeys(robustness_directory(r, store) for r in rows))
    for d in dirs:
        robustness_run.check_row(d, sizes["n"])
    cache = robustness_run.BaseSideCache()
    written = []
    for d in dirs:
        rob = robustness_run.measure(d, batch_size=batch_size, cache=cache, progress=progress,
                                     status=lambda line, d=d: status(f"{d.name}: {line}"), **sizes)
        # a stored row is written under the store's lock, as submit writes it
        in_store = d.resolve().parent == Path(store).resolve()
        with locked(Path(store).parent.parent) if in_store else nullcontext():
            written.append(write_robustness(rob, d))
    return written


__all__ = ["DEFAULT_STORES", "EtbenchError", "accuracy", "compare", "robustness", "score", "score_many"]
