"""Where model weights come from: a reference (alias, hub id, local directory, ...) → model + tokenizer.

Nothing else in etbench knows how weights are found or loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EtbenchError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A model ready for evaluation, with the tokenizer that goes with it."""

    ref: str  # what the user asked for
    source: str  # what was actually loaded (path or hub id)
    model: Any
    tokenizer: Any


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise EtbenchError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load(ref: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise EtbenchError(f"{ref}: not a model directory (no config.json)")
        source = str(path)
    elif ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").split("/", 1)[-1]:
        raise EtbenchError(f"{ref}: no such model directory")
    else:
        source = ref
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise EtbenchError(
            f"{ref}: weights not available here ({type(err).__name__}); download them with "
            f"`huggingface-cli download {source}` on a machine with hub access, or pass a local directory"
        ) from None
    model.to(device).eval()
    return LoadedModel(ref=ref, source=source, model=model, tokenizer=tokenizer)
