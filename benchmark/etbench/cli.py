"""The ``etbench`` command: a thin typer layer. Each command parses, calls one public library function
(``etbench.api`` and the modules it names), and prints; bad input becomes one line on stderr and a
non-zero exit, never a traceback.

Every command imports what it needs inside its own body: that keeps ``etbench --help`` and the
publishing commands (``leaderboard build``, ``report``, ``compare``) from importing torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.exceptions import TyperException

from etbench.core.checks import check_batch_size, check_draws, check_items, check_range, check_seed
from etbench.core.errors import EtbenchError
from etbench.core.io import (
    Writer,
    check_output_dir,
    check_output_file,
    claimed_file,
    refuse_foreign_file,
)
from etbench.core.progress import quiet_third_party

HELP_OPTIONS = ["-h", "--help"]  # every command's (a subcommand inherits its group's)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},
    help="etbench: score how fine-tuning changes a model's entity-tracking mechanism.",
)
data_app = typer.Typer(no_args_is_help=True, help="Generate the benchmark's prompts.")
models_app = typer.Typer(no_args_is_help=True, help="Model aliases and loading.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
circuit_app = typer.Typer(no_args_is_help=True, help="Find circuits and measure their faithfulness.")
app.add_typer(circuit_app, name="circuit")

EXIT_USER_ERROR = 2
#: The single-file writers (``--out FILE``): each keeps a manifest in the file's directory and never replaces a
#: file (or a link) of that name that it did not write (``etbench.core.io``'s ownership rule).
DATA_WRITER = Writer("etbench data generate", ".etbench-data-manifest.json")
CIRCUIT_WRITER = Writer("etbench circuit", ".etbench-circuit-manifest.json")


def _fail(message: str) -> None:
    typer.echo(f"etbench: error: {message}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _status(line: str) -> None:
    """A status line (a model loading, a file written) on stderr, apart from the results on stdout."""
    typer.echo(line, err=True)


def _print_version(value: bool) -> None:
    if value:
        from etbench import __version__

        typer.echo(f"etbench {__version__}")
        raise typer.Exit()


@app.callback(context_settings={"help_option_names": HELP_OPTIONS})
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print etbench's version and exit.")) -> None:
    """etbench: score how fine-tuning changes a model's entity-tracking mechanism."""


@data_app.command("generate")
def data_generate(
    n_boxes: int = typer.Option(7, "--n-boxes", help="Boxes per context (2-26); the paper uses 7."),
    seed: int = typer.Option(0, help="Seed of the example stream."),
    n: int = typer.Option(500, "--n", help="Number of examples (blocks of n-boxes queries per context)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write JSONL here instead of stdout."),
    fmt: str = typer.Option("paper", "--format", help="'paper' (the reference schema) or 'etbench' (all fields)."),
) -> None:
    """Generate prompts as JSONL (the paper's schema by default)."""
    from etbench.core.io import atomic_write_jsonl
    from etbench.task import prompts

    if fmt not in ("paper", "etbench"):
        _fail(f"--format must be 'paper' or 'etbench', got {fmt!r}")
    check_items(n, "--n")
    check_seed(seed)
    if out is not None:
        check_output_file(out)
        refuse_foreign_file(out, DATA_WRITER)
    examples = prompts.generate(n_boxes=n_boxes, n=n, seed=seed)
    rows = prompts.paper_records(examples) if fmt == "paper" else [ex.to_record() for ex in examples]
    if out is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        with claimed_file(out, DATA_WRITER):
            atomic_write_jsonl(out, rows)
        typer.echo(f"wrote {len(rows)} examples to {out}", err=True)


@app.command("accuracy")
def accuracy_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Alias, hub id, local directory, .gguf file or adapter dir."),
    n_boxes: list[int] = typer.Option([7], "--n-boxes", help="Box count; repeat for several (e.g. 3 5 7)."),
    n: int = typer.Option(500, "--n", help="Examples per box count (the paper: 500)."),
    seed: int = typer.Option(0, help="Seed of the example stream (0 = the lm-eval task's items)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    dtype: Optional[str] = typer.Option(None, help="float32 (default), bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, or auto (device_map=auto)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for accuracy.json + accuracy_items.jsonl."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    backend: str = typer.Option("hooks", "--backend", help="hooks (torch hooks) or nnsight (nnsight traces)."),
    remote: bool = typer.Option(False, "--remote", help="With --backend nnsight: run on NDIF (a hub model it "
                                "hosts; NDIF_API_KEY or `nnsight login`)."),
) -> None:
    """Full-model accuracy (greedy top-1 over the whole vocabulary), with a 95% CI."""
    from etbench import api, models
    from etbench.metrics import accuracy

    _check_model_options(n=n, batch_size=batch_size, seed=seed, dtype=dtype or "float32", device=device)
    for count in n_boxes:
        check_range(count, "--n-boxes", 2, 26)
    if out is not None:
        check_output_dir(out)
        accuracy.check_run_outputs(out)
    models.resolve(model)  # a missing model is reported before anything is loaded
    # remote: a given --dtype is refused (NDIF's dtype), so no default stands in for it
    result = api.accuracy(model, n_boxes=n_boxes, n=n, seed=seed, batch_size=batch_size, progress=not no_progress,
                          dtype=dtype if remote else dtype or "float32", device=device, backend=backend,
                          remote=remote, report=None if no_progress else _status)
    typer.echo(accuracy.format_run(result))
    if out is not None:
        for path in accuracy.write_run(result, out):
            typer.echo(f"wrote {path}", err=True)


@app.command("score")
def score_cmd(
    base: str = typer.Option("tiny-base", "--base", help="Base model (alias, hub id, directory, .gguf, adapter)."),
    ft: str = typer.Option("tiny-ft", "--ft", help="Fine-tuned model, same architecture and tokenizer."),
    out: Path = typer.Option(Path("etbench-out"), "--out", "-o", help="Output directory (stages cached here)."),
    preset: str = typer.Option("quick", help="quick (sized for a 2-core CPU), quick-sized, standard (the "
                               "leaderboard's protocol) or paper (the paper's sizes)."),
    exact: bool = typer.Option(False, "--exact", help="Exact path patching for discovery (default of 'paper')."),
    fast: bool = typer.Option(False, "--fast", help="Attribution screen + exact verification (default of 'quick')."),
    seed: int = typer.Option(0, help="Seed of every sampled set."),
    circuit_base: Optional[str] = typer.Option(None, "--circuit-base", help="Circuit JSON or paper:<name> instead of discovery."),
    circuit_ft: Optional[str] = typer.Option(None, "--circuit-ft", help="Circuit JSON or paper:<name> instead of discovery."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)."),
    device: str = typer.Option("cpu", help="cpu, cuda, or auto."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    backend: str = typer.Option("hooks", "--backend", help="hooks (torch hooks) or nnsight (the same edits through nnsight traces)."),
    share_base_weights: bool = typer.Option(False, "--share-base-weights", help="One copy of the base weights for a LoRA fine-tune of it (7B memory; logits equal to ~1e-7)."),
    remote: bool = typer.Option(False, "--remote", help="With --backend nnsight: run on NDIF (hub models it hosts; NDIF_API_KEY or `nnsight login`; needs --circuit-base/--circuit-ft; DCM not run)."),
    reuse_stages: list[Path] = typer.Option([], "--reuse-stages", help="An earlier run's --out directory: its stages with the same inputs are copied, not computed (e.g. the base side of another fine-tune of this base). Repeatable."),
    plan: bool = typer.Option(False, "--plan", help="Print the stage graph of this preset (stages, sides, inputs) and exit: nothing is loaded or written."),
) -> None:
    """Score a fine-tuned model against its base: accuracy, faithfulness, head overlap, CMAP."""
    from etbench import api
    from etbench.publish.terminal import format_scorecard, format_timings

    if exact and fast:
        _fail("--exact and --fast exclude each other")
    if plan:
        typer.echo(api.score_plan(preset, discovery="exact" if exact else "fast" if fast else None))
        return
    run = api.score(base, ft, out, preset=preset, discovery="exact" if exact else "fast" if fast else None,
                    seed=seed, circuit_base=circuit_base, circuit_ft=circuit_ft, dtype=dtype, device=device,
                    progress=not no_progress, backend=backend, share_base_weights=share_base_weights,
                    remote=remote, reuse_stages=reuse_stages)
    typer.echo(format_scorecard(run.card))
    typer.echo(format_timings(run), err=True)
    typer.echo(f"wrote {run.path} (+ items.jsonl, report.md, report.html)", err=True)


@app.command("score-many")
def score_many_cmd(
    plan: Optional[Path] = typer.Option(None, "--plan", help="YAML/JSON plan: pairs [{base, ft, out}] (+ preset, seed, dtype, device)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of every pair (with --ft)."),
    ft: list[str] = typer.Option([], "--ft", help="A fine-tuned model; repeat for several (one pair each)."),
    out: Path = typer.Option(Path("etbench-out"), "--out", "-o", help="With --base/--ft: one directory per fine-tune under it."),
    preset: str = typer.Option("quick", help="quick, quick-sized, standard or paper (a plan file's 'preset' wins)."),
    exact: bool = typer.Option(False, "--exact", help="Exact path patching for discovery."),
    fast: bool = typer.Option(False, "--fast", help="Attribution screen + exact verification."),
    seed: int = typer.Option(0, help="Seed of every sampled set."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)."),
    device: str = typer.Option("cpu", help="cpu, cuda, or auto (on each worker)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="auto or HOST:PORT of a Ray cluster; default: start a local Ray for this run."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="Local Ray only: CPU slots (default: all CPUs)."),
    cpus: float = typer.Option(1.0, "--cpus-per-side", help="CPUs each side of a pair requests."),
    gpus: Optional[float] = typer.Option(None, "--gpus-per-side", help="GPUs each side requests (default: 1 with --device cuda, else 0)."),
    retries: int = typer.Option(0, "--retries", help="Times Ray reruns a side whose worker died (it resumes from the stage cache)."),
) -> None:
    """Score several pairs on Ray: each pair's base-side and ft-side stages run as concurrent tasks."""
    from etbench import api
    from etbench.scoring import distributed

    if exact and fast:
        _fail("--exact and --fast exclude each other")
    settings = {"preset": preset, "seed": seed, "dtype": dtype, "device": device,
                "discovery": "exact" if exact else "fast" if fast else None}
    if plan is not None:
        if base is not None or ft:
            _fail("give either --plan or --base/--ft, not both")
        jobs, from_plan = distributed.load_plan(plan)
        settings.update(from_plan)
    else:
        if base is None or not ft:
            _fail("give --plan, or --base and at least one --ft")
        jobs = distributed.jobs_for(base, ft, out)
    results = api.score_many(jobs, **settings, address=ray_address, num_cpus=num_cpus, cpus=cpus, gpus=gpus,
                             retries=retries, echo=lambda line: typer.echo(line, err=True))
    typer.echo(distributed.format_results(results))


@circuit_app.command("discover", help=(
    "Find the four head groups (A value fetcher, B position transmitter, C position detector, D structure "
    "reader) by path patching, then size the circuit and prune by minimality.\n\n"
    "Time on a CPU: the defaults (--fast, --n 16, no pruning; the quick preset's circuit stage) take 81 s "
    "for the whole command on tiny-base on 2 idle AVX2 cores (65 forward passes); --n 32 halves the "
    "ranking's sampling variance for twice the passes (153 s). tests/bench/bench_discover.py times the command."))
def circuit_discover(
    model: str = typer.Option(..., "--model", "-m", help="Alias, hub id, directory, .gguf or adapter dir."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the circuit JSON."),
    exact: bool = typer.Option(False, "--exact", help="Path patching of every head (the paper's method)."),
    fast: bool = typer.Option(False, "--fast", help="Attribution screen + exact verification (default)."),
    n: int = typer.Option(16, "--n", help="Base prompts for path patching (the paper: 300; the quick preset: 16)."),
    seed: int = typer.Option(0, help="Seed of the prompts and noise pairs."),
    size: str = typer.Option("top-k", "--size", help="How the circuit's size is chosen: 'top-k' (the paper's k "
                             "per group) or 'faithfulness' (grown along the ranking to --target x the ceiling of "
                             "the circuit form; see docs/method.md)."),
    target: float = typer.Option(0.9, "--target", help="With --size faithfulness: the fraction of the form's "
                                 "ceiling to reach."),
    minimality: Optional[str] = typer.Option(None, "--minimality", help="Pruning after the search: 'pairs' "
                                             "(paper; default with --exact), 'single' or 'none' (default with "
                                             "--fast, as in the quick preset: on the tiny models 'single' pruned "
                                             "the fast circuits to 1 and 0 heads). Pruning is most of the time "
                                             "of a run on a CPU."),
    batch_size: int = typer.Option(16, "--batch-size"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    # the help text (with its timings) is the decorator's help=
    from etbench import models
    from etbench.metrics import discovery
    from etbench.schema.circuit import check_sizing

    if exact and fast:
        _fail("--exact and --fast exclude each other")
    _check_model_options(n=n, batch_size=batch_size, seed=seed, dtype=dtype, device=device)
    check_sizing(size, target)
    # the command's fast default prunes nothing (the library's fast default, 'single', is kept for API users)
    minimality = discovery.check_minimality(minimality or ("pairs" if exact else "none"))
    check_output_file(out)
    refuse_foreign_file(out, CIRCUIT_WRITER)
    models.resolve(model)
    loaded = models.load(model, dtype=dtype, device=device, report=None if no_progress else _status)
    result = discovery.discover(loaded, mode="exact" if exact else "fast", n=n, seed=seed, batch_size=batch_size,
                               minimality_mode=minimality, size=size, target_fraction=target,
                               model_name=model, progress=not no_progress)
    with claimed_file(out, CIRCUIT_WRITER):
        result.circuit.save(out)
    typer.echo(discovery.format_discovery(result))
    typer.echo(f"wrote {out}", err=True)


@circuit_app.command("eval")
def circuit_eval(
    model: str = typer.Option(..., "--model", "-m", help="The model to evaluate the circuit on."),
    circuit: str = typer.Option(..., "--circuit", "-c", help="Circuit JSON, paper:<name> or a shipped name."),
    n: int = typer.Option(100, "--n", help="Evaluation prompts (the paper: 500)."),
    mean_n: int = typer.Option(100, "--mean-n", help="Prompts for the mean-ablation statistics."),
    random_draws: int = typer.Option(10, "--random-draws", help="Random circuits of the same group sizes."),
    completeness_draws: int = typer.Option(10, "--completeness-draws", help="Random subsets K (0 = skip)."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(16, "--batch-size"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the evaluation JSON here."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Circuit accuracy with every other head mean-ablated, faithfulness, random baseline,
    completeness and the faithfulness curve."""
    from etbench import models
    from etbench.metrics import faithfulness
    from etbench.schema.circuit import load_circuit

    _check_model_options(n=n, batch_size=batch_size, seed=seed, dtype=dtype, device=device)
    check_items(mean_n, "--mean-n")
    check_draws(random_draws, "--random-draws")
    check_draws(completeness_draws, "--completeness-draws")
    if out is not None:
        check_output_file(out)
        refuse_foreign_file(out, CIRCUIT_WRITER)
    circ = load_circuit(circuit)  # a bad circuit fails before the model loads
    _check_circuit_fits(circ, model)
    loaded = models.load(model, dtype=dtype, device=device, report=None if no_progress else _status)
    ev = faithfulness.evaluate_circuit(loaded, circ, n=n, seed=seed, mean_n=mean_n, batch_size=batch_size,
                                       random_draws=random_draws, completeness_draws=completeness_draws,
                                       model_name=model, progress=not no_progress)
    typer.echo(faithfulness.format_evaluation(ev))
    if out is not None:
        with claimed_file(out, CIRCUIT_WRITER):
            ev.save(out)
        typer.echo(f"wrote {out}", err=True)


@app.command("tasks-path")
def tasks_path() -> None:
    """Print the lm-eval task directory (for `lm_eval --include_path ...`)."""
    from etbench.task.harness import tasks_dir

    typer.echo(str(tasks_dir()))


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def lm_eval_cmd(ctx: typer.Context) -> None:
    """lm-eval with etbench's tasks included: `etbench lm-eval --model hf ... --tasks entity_tracking`."""
    from etbench.task.harness import run_lm_eval

    run_lm_eval(list(ctx.args))


@models_app.command("list")
def models_list(
    wide: bool = typer.Option(False, "--wide", help="Every column: where the weights come from, and why each "
                              "model is or is not available (~160 columns)."),
) -> None:
    """Show every alias, what it is, and whether it is available offline right now."""
    from etbench import models

    typer.echo(models.format_model_table(models.list_models(), wide=wide))


@models_app.command("export", short_help="Write a model as a plain transformers directory (adapters merged).")
def models_export(
    model: str = typer.Argument(..., metavar="MODEL", help="Alias, hub id, directory, .gguf file or adapter dir."),
    directory: Path = typer.Argument(..., metavar="DIR", help="New or empty directory (or an earlier export's)."),
    dtype: str = typer.Option("float32", help="float32 (the weights etbench scores on a CPU), bfloat16 or "
                              "float16."),
) -> None:
    """Write MODEL as a plain transformers directory (config, safetensors, tokenizer; adapters merged), e.g. for
    `lm_eval --model hf --model_args pretrained=DIR`.

    The export is reloaded and checked against the model (same tokens, same logits) before it is put in
    place; DIR is refused when it holds files an earlier export did not write."""
    from etbench import models

    models.check_dtype(dtype)
    models.check_export_dir(directory)  # a refused directory or a missing model costs no model load
    models.resolve(model)
    path = models.export_model(model, directory, dtype=dtype, report=_status)
    typer.echo(f"wrote {path}")


# --- submissions, leaderboard, compare, report (etbench.publish) ---
leaderboard_app = typer.Typer(no_args_is_help=True, help="Build the leaderboard from stored scorecards.")
app.add_typer(leaderboard_app, name="leaderboard")


@app.command("submit")
def submit_cmd(
    file: Path = typer.Argument(..., help="A submission YAML (see submissions/README.md)."),
    root: Path = typer.Option(Path("."), "--root", help="Directory holding submissions/ and leaderboards/."),
    replace: bool = typer.Option(False, "--replace", help="Update an existing submission of the same name."),
    check: bool = typer.Option(False, "--check", help="Validate only; write nothing."),
    add_edges: bool = typer.Option(False, "--add-edges", help="Add the edges section its scorecard lacks (from the "
                                   "card's own models, circuits and seed), then store it: replaces the stored entry "
                                   "holding this scorecard."),
    work: Optional[Path] = typer.Option(None, "--work", help="With --add-edges: keep its stages here (resumable; "
                                        "default a temporary directory)."),
    device: str = typer.Option("cpu", "--device", help="With --add-edges: where the models run."),
) -> None:
    """Validate a submission, ingest its scorecard and rebuild the leaderboard (all or nothing)."""
    from etbench.publish import submissions

    if check and add_edges:
        _fail("--check writes nothing; --add-edges computes and stores a section: give one of them")
    if check:
        sub = submissions.validate(file)
        typer.echo(f"{file}: valid submission {sub.name!r}")
        for note in sub.notes:
            typer.echo(f"note: {note}", err=True)
        return
    if (work is not None or device != "cpu") and not add_edges:
        _fail("--work and --device apply to --add-edges only")
    result = submissions.submit(file, root=root, replace=replace, add_edges=add_edges, work_dir=work, device=device,
                                progress=add_edges)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"submitted {result.name}: results in {root / 'submissions' / 'results' / result.name}, "
               f"leaderboard rebuilt ({result.rows} rows)")


@leaderboard_app.command("build")
def leaderboard_build(
    root: Path = typer.Option(Path("."), "--root", help="Directory holding submissions/results/."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default ROOT/leaderboards)."),
    no_paper: bool = typer.Option(False, "--no-paper", help="Leave out the paper's published rows."),
) -> None:
    """Regenerate leaderboards/ (CSV, JSON, Markdown, HTML, reports) deterministically."""
    from etbench.publish import leaderboard

    notes: list[str] = []
    paths = leaderboard.build(root, out, include_paper=not no_paper, notes=notes)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {len(paths)} files to {out or root / 'leaderboards'}")


@app.command("compare")
def compare_cmd(
    a: str = typer.Argument(..., help="Scorecard path, submission name or model ref (the reference side)."),
    b: str = typer.Argument(..., help="Scorecard path, submission name or model ref (the compared side)."),
    store: list[Path] = typer.Option([Path("submissions/results"), Path("etbench-out")], "--store",
                                     help="Where to look for scorecards by name or ref (repeatable); "
                                          "default: submissions/results and etbench-out (`etbench score`'s output)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.md + report.html here."),
    correction: str = typer.Option("holm", "--correction", help="Multiple-comparison correction: holm or bh."),
) -> None:
    """Paired statistics on the same items: McNemar, paired bootstrap CIs, Holm."""
    from etbench import api
    from etbench.publish import report

    if out is not None:
        check_output_dir(out)
    comp = api.compare(a, b, store, correction)
    # written before anything is printed: a refused write (a file compare did not create) is the only output
    written = [] if out is None else report.write_doc(report.comparison_report(comp), out,
                                                      writer=report.COMPARE_WRITER)
    typer.echo(report.format_comparison(comp))
    for path in written:
        typer.echo(f"wrote {path}", err=True)


@app.command("report")
def report_cmd(
    scorecard_ref: str = typer.Argument(..., help="scorecard.json (or its directory) or a stored submission name."),
    store: list[Path] = typer.Option([Path("submissions/results"), Path("etbench-out")], "--store",
                                     help="Where stored submissions and `etbench score` output live."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory for report.md + report.html "
                                       "(default: the scorecard's own directory)."),
) -> None:
    """Markdown + HTML report of one scorecard (tables, paired tests, figures), beside it or in --out."""
    from etbench.publish import report

    if out is not None:
        check_output_dir(out)
    found = report.find_one(scorecard_ref, store)
    if out is None:
        out = check_output_dir(found.path.parent)
    # a scorecard given by path gets the title `etbench score` gives the report it writes beside it, so in a
    # score run's directory this writes the same bytes (which the ownership check lets through), not a rival
    title = "" if Path(scorecard_ref).exists() else found.name
    doc = report.scorecard_report(found.card, found.items, title=title, robust=found.robustness())
    for path in report.write_doc(doc, out, writer=report.REPORT_WRITER):
        typer.echo(f"wrote {path}")


@app.command("edges")
def edges_cmd(
    base: str = typer.Option(..., "--base", help="The base model (alias, hub id, directory, .gguf or adapter dir)."),
    ft: str = typer.Option(..., "--ft", help="The fine-tuned model."),
    circuit_base: str = typer.Option(..., "--circuit-base", help="The base's circuit: JSON file or shipped name."),
    circuit_ft: str = typer.Option(..., "--circuit-ft", help="The fine-tuned model's circuit (JSON file)."),
    n: int = typer.Option(32, "--n", help="Prompts (and noise pairs) the edges are path-patched on."),
    seed: int = typer.Option(0, help="Seed of the prompts and noise pairs, and of the bootstrap."),
    top_fraction: float = typer.Option(0.25, "--top-fraction", help="Each model's top edges per type: this "
                                       "fraction of the type's edges, by |effect|."),
    types: list[str] = typer.Option([], "--type", help="Edge type to score (repeatable: D->C, C->B, B->A, "
                                    "A->logits); default all. D->C is the dearest."),
    batch_size: int = typer.Option(8, "--batch-size"),
    out: Path = typer.Option(Path("etbench-edges"), "--out", "-o", help="Directory for edges_base.json, "
                             "edges_ft.json and edge_comparison.json."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Edges between the head groups on both models, and how far the fine-tune rewires them (docs/method.md §13).

    Path patching through one receiver; top-edge overlap per type with its chance level and a CI over prompts."""
    from etbench import models
    from etbench.metrics import edges
    from etbench.schema.circuit import load_circuit

    _check_model_options(n=n, batch_size=batch_size, seed=seed, dtype=dtype, device=device)
    edges.check_edge_options(n=n, types=types, top_fraction=top_fraction)
    if base == ft:
        _fail("--base and --ft must be two models")
    check_output_dir(out)
    edges.check_edge_outputs(out)
    circuits = load_circuit(circuit_base), load_circuit(circuit_ft)  # a bad circuit fails before a model loads
    for circuit, ref in zip(circuits, (base, ft)):
        _check_circuit_fits(circuit, ref)
    loaded = [models.load(ref, dtype=dtype, device=device, report=None if no_progress else _status)
              for ref in (base, ft)]
    scores_base, scores_ft, cmp = edges.compare_models(*loaded, *circuits, n=n, seed=seed, batch_size=batch_size,
                                                       types=types, top_fraction=top_fraction,
                                                       progress=not no_progress)
    written = edges.write_edges(out, scores_base, scores_ft, cmp)
    typer.echo(edges.format_edge_comparison(cmp))
    for path in written:
        typer.echo(f"wrote {path}", err=True)


@app.command("robustness")
def robustness_cmd(
    rows: list[str] = typer.Argument(..., help="Leaderboard rows (names in --store) or directories holding a "
                                     "scorecard.json; several rows of one base share its side."),
    store: Path = typer.Option(Path("submissions/results"), "--store", help="Where rows given by name live."),
    n: int = typer.Option(100, "--n", help="Items per wording and model (accuracy and circuit faithfulness; the "
                          "paper wording's are the scorecard's own first n)."),
    mean_n: int = typer.Option(50, "--mean-n", help="Mean-ablation prompts per held-out wording and model."),
    diff_n: int = typer.Option(50, "--diff-n", help="Prompts of the model-diffing view."),
    batch_size: int = typer.Option(16, "--batch-size"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads (default: torch's)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Template robustness and the model-diffing view of each row (docs/method.md §14-15): its models and
    committed circuits in the paper's wording and two held-out ones, written to robustness.json beside the
    row's scorecard (shown by `etbench report` and on the leaderboard)."""
    from etbench import api

    check_batch_size(batch_size)
    if threads is not None:
        check_range(threads, "--threads", 1, 1024)
        import torch  # only when asked: the thread count is torch's

        torch.set_num_threads(threads)
    for path in api.robustness(rows, store, n=n, mean_n=mean_n, diff_n=diff_n, batch_size=batch_size,
                               progress=not no_progress, status=_status):
        typer.echo(f"wrote {path}")


def _check_circuit_fits(circuit, model: str) -> None:
    """``model`` resolves, and ``circuit``'s heads exist in it when its config is on disk (read, not loaded):
    a 7B circuit on a small model failed only after the load."""
    from etbench import models

    shape = models.config_shape(models.resolve(model))
    if shape is not None:
        circuit.validate(*shape, what=model)


def _check_model_options(*, n: int, batch_size: int, seed: int, dtype: str, device: str) -> None:
    """The options of a model command that can be wrong, checked before the model is loaded."""
    from etbench import models

    check_items(n, "--n")
    check_batch_size(batch_size)
    check_seed(seed)
    models.check_dtype(dtype)
    models.check_device(device)


def main() -> None:
    quiet_third_party()
    try:
        # not standalone: typer's usage errors (a missing argument, an unknown option or command) reach the
        # handler below and become the one-line error instead of typer's framed box
        status = _command()(standalone_mode=False, prog_name="etbench")
    except TyperException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `etbench` / `etbench leaderboard`: help shown
            sys.exit(EXIT_USER_ERROR)
        ctx = getattr(err, "ctx", None)
        _exit_with(err.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
    except typer.Abort:
        _exit_with("aborted")
    except EtbenchError as err:
        _exit_with(str(err))
    except OSError as err:  # a file or directory that cannot be read or written: name it, no traceback
        where = f"{err.filename}: " if err.filename else ""
        _exit_with(f"{where}{err.strerror or err}")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        _exit_with(f"unreadable input ({type(err).__name__}: {err})")
    sys.exit(status if isinstance(status, int) else 0)


def _command():
    """The click command behind ``app``, with no type shown for on/off flags: typer's help prints ``<bool>``
    beside ``--no-progress`` or ``--help``, which take no value."""
    command = typer.main.get_command(app)
    pending = [command]
    while pending:
        current = pending.pop()
        # the context a run gives the command: get_params creates (and keeps) its help option from it
        context = typer.Context(current, **{"help_option_names": HELP_OPTIONS, **(current.context_settings or {})})
        for param in current.get_params(context):
            if getattr(param, "is_flag", False):
                param.metavar = ""
        pending.extend(getattr(current, "commands", {}).values())
    return command


def _exit_with(message: str) -> None:
    typer.echo(f"etbench: error: {' '.join(message.split())}", err=True)
    sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
