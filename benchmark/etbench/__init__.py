"""etbench: a benchmark of how fine-tuning changes a model's entity-tracking mechanism
(Prakash et al., ICLR 2024), for any causal LM scored against its base.

Layers, each importing only from the ones before it::

    core -> schema -> task -> models -> mech -> metrics -> training -> scoring -> publish -> api -> cli

The public API below is loaded lazily (lm-eval's pattern): ``import etbench`` stays light (no torch)
until a name that needs a model is used::

    import etbench
    run = etbench.score("tiny-base", "tiny-ft", out_dir="etbench-out")
    card = etbench.Scorecard.load("etbench-out/scorecard.json")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_PUBLIC: dict[str, str] = {
    "EtbenchError": "etbench.core.errors",
    "Estimate": "etbench.core.stats",
    "Circuit": "etbench.schema.circuit",
    "load_circuit": "etbench.schema.circuit",
    "paper_circuit": "etbench.schema.circuit",
    "Scorecard": "etbench.schema.scorecard",
    "generate": "etbench.task.prompts",
    "load_model": "etbench.models.load",
    "export_model": "etbench.models.export",
    "discover": "etbench.metrics.discovery",
    "evaluate_circuit": "etbench.metrics.faithfulness",
    "score": "etbench.api",
    "compare": "etbench.api",
    "accuracy": "etbench.api",
    "score_many": "etbench.api",
}
_RENAMED = {"load_model": "load"}

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'etbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
