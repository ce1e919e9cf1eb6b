"""The ``etbench`` command: a thin typer layer. Each command parses, calls one library function,
and prints; bad input becomes one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import EtbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="etbench: score how fine-tuning changes a model's entity-tracking mechanism.",
)
data_app = typer.Typer(no_args_is_help=True, help="Generate the benchmark's prompts.")
models_app = typer.Typer(no_args_is_help=True, help="Model aliases and loading.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
    typer.echo(f"etbench: error: {message}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


@data_app.command("generate")
def data_generate(
    n_boxes: int = typer.Option(7, "--n-boxes", help="Boxes per context (2-26); the paper uses 7."),
    seed: int = typer.Option(0, help="Seed of the example stream."),
    n: int = typer.Option(500, "--n", help="Number of examples (blocks of n-boxes queries per context)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write JSONL here instead of stdout."),
    fmt: str = typer.Option("paper", "--format", help="'paper' (the reference schema) or 'etbench' (all fields)."),
) -> None:
    """Generate prompts as JSONL (the paper's schema by default)."""
    import json

    from . import data
    from .fileio import atomic_write_jsonl

    if fmt not in ("paper", "etbench"):
        _fail(f"--format must be 'paper' or 'etbench', got {fmt!r}")
    examples = data.generate(n_boxes=n_boxes, n=n, seed=seed)
    rows = data.paper_records(examples) if fmt == "paper" else [ex.to_record() for ex in examples]
    if out is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        atomic_write_jsonl(out, rows)
        typer.echo(f"wrote {len(rows)} examples to {out}", err=True)


@models_app.command("list")
def models_list() -> None:
    """Show every alias, what it is, and whether it is available offline right now."""
    from . import models

    typer.echo(models.format_model_table(models.list_models()))


def main() -> None:
    try:
        app()
    except EtbenchError as err:
        typer.echo(f"etbench: error: {err}", err=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
