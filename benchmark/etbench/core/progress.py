"""Progress bars for long work (rich, on stderr); silent when disabled or not a terminal run."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield from bar.track(items, total=total, description=description)


def quiet_third_party() -> None:
    """Silence other libraries' progress bars and known-harmless warnings inside etbench's commands, so
    etbench's own bars are what a user sees. Environment only, set before those libraries are imported:
    importing them here would cost every command their start-up time."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # hub downloads
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "Loading weights", GGUF conversion bars, notices
    os.environ.setdefault("TQDM_DISABLE", "1")  # any other tqdm bar (datasets, peft)
    # transformers 5 warns from PEFT's own call of a deprecated property; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
