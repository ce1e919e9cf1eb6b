"""Progress bars for long work (rich, on stderr); silent when disabled or not a terminal run."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


def _ignore_harmless_warnings() -> None:
    # transformers 5 warns from PEFT's own call of a deprecated property; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def quiet_third_party() -> None:
    """Silence other libraries' progress bars and known-harmless warnings for the whole process (the
    ``etbench`` command), so etbench's own bars are what a user sees. Environment only, set before those
    libraries are imported: importing them here would cost every command their start-up time. Loading
    weights is quiet in the Python API too (``quiet_loading``)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # hub downloads
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "Loading weights", GGUF conversion bars, notices
    os.environ.setdefault("TQDM_DISABLE", "1")  # any other tqdm bar (datasets, peft)
    _ignore_harmless_warnings()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside the block, transformers prints no weight-loading bar or notice and the known-harmless warnings
    are not shown; its settings are restored after, so a notebook's own use of transformers is untouched.
    What ``quiet_third_party`` does for the command, for one model load called from Python."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            _ignore_harmless_warnings()
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
