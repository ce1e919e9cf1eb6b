"""The scorecard: the typed, versioned result of scoring a fine-tuned model against its base.

It is the boundary between measuring and reporting: ``etbench score`` writes it; the leaderboard,
submissions and comparison reports only read it (and its per-item side file) and never re-run a
model. Plain dataclasses; pydantic's ``TypeAdapter`` validates them when read back and derives the
JSON Schema, so the types here are the single definition of the format.

Every number that is an estimate carries its CI, n and method (``Estimate``). Per-item outcomes
(one row per item × measurement) go to a JSONL side file so paired statistics can be computed later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from etbench.core.errors import EtbenchError
from etbench.core.io import atomic_write_json, atomic_write_jsonl, config_hash, dumps_json, read_jsonl
from etbench.core.stats import Estimate
from etbench.schema.circuit import GROUPS

__all__ = ["Estimate", "GROUPS", "config_hash"]  # re-exported: the types every score is built from

SCHEMA_VERSION = 1
#: Bump when prompts, metrics or presets change meaning: scorecards of another version are not comparable.
BENCHMARK_VERSION = "1.0"


@dataclass
class ModelCard:
    """What was scored: enough to find the exact weights again."""

    ref: str  # as the user gave it (alias, hub id, path)
    source: str  # what was loaded
    architecture: str  # config.model_type
    n_layers: int
    n_heads: int
    revision: Optional[str] = None


@dataclass
class AccuracyScore:
    model: Literal["base", "ft"]
    n_boxes: int
    accuracy: Estimate


@dataclass
class CircuitSummary:
    """A circuit as used in this scorecard (the full node list lives in the circuit JSON)."""

    name: str  # "base", "ft", or a user/paper circuit name
    found_on: str  # model ref it was discovered on, or "paper"
    method: str  # "path-patching", "attribution+verify", "given"
    heads: dict[str, list[list[int]]]  # group -> [[layer, head], ...]


@dataclass
class FaithfulnessScore:
    circuit: str  # CircuitSummary.name
    model: Literal["base", "ft"]
    model_accuracy: Estimate
    circuit_accuracy: Estimate
    faithfulness: Estimate  # circuit acc / model acc
    random_circuit_accuracy: Estimate  # same group sizes, mean over draws (n = draws)


@dataclass
class OverlapScore:
    """Base heads recovered in the fine-tuned model's set, for one group or "all"."""

    heads: Literal["circuit", "dcm"]
    group: str  # a GROUPS name or "all"
    base_in_ft: Estimate  # |base ∩ ft| / |base|
    jaccard: Estimate


@dataclass
class CmapScore:
    """Fine-tuned activations patched into the base model (Cross-Model Activation Patching)."""

    variant: str  # "output" (head z), or input variants "q", "k", "v", "qk", "qkv"
    group: str  # a GROUPS name or "full"
    patched_accuracy: Estimate
    gain: Estimate  # patched - base accuracy (paired CI)
    normalised_gain: Estimate  # (patched - base) / (ft - base); value None when ft == base


@dataclass
class DcmScore:
    circuit: str
    group: str
    desideratum: str
    selected_heads: list[list[int]]
    test_accuracy: Estimate


@dataclass
class SemanticsScore:
    """The paper's cross-model semantics check: one circuit's DCM heads for (group, desideratum) patched
    into a model from fresh source prompts, accuracy against the desideratum's target."""

    heads_of: Literal["base", "ft"]  # whose DCM selection was patched
    model: Literal["base", "ft"]  # the model it was patched into
    group: str
    desideratum: str
    heads: list[list[int]]
    accuracy: Estimate  # mean over repeats; low/high = min/max over repeats, sd in the note


@dataclass
class Provenance:
    etbench_version: str
    benchmark_version: str
    libraries: dict[str, str]  # torch, transformers, lm-eval, ... versions
    device: str
    dtype: str


@dataclass
class Scorecard:
    """Everything ``etbench score --base X --ft Y`` measured."""

    base: ModelCard
    ft: ModelCard
    config: dict[str, Any]  # preset sizes, seeds, modes: all that shapes the numbers
    config_hash: str
    provenance: Provenance
    accuracy: list[AccuracyScore] = field(default_factory=list)
    circuits: list[CircuitSummary] = field(default_factory=list)
    faithfulness: list[FaithfulnessScore] = field(default_factory=list)
    overlap: list[OverlapScore] = field(default_factory=list)
    dcm: list[DcmScore] = field(default_factory=list)
    cmap: list[CmapScore] = field(default_factory=list)
    semantics: list[SemanticsScore] = field(default_factory=list)
    limit: Optional[int] = None  # set when a run was truncated for a smoke test: never on a leaderboard
    items_file: str = "items.jsonl"
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def load(cls, path: str | Path) -> Scorecard:
        """Read and validate a ``scorecard.json`` (a file, or the directory holding one)."""
        path = Path(path)
        return load(path / "scorecard.json" if path.is_dir() else path)

    def save(self, directory: str | Path, items: list[dict[str, Any]] | None = None) -> Path:
        """Write ``scorecard.json`` (and the per-item rows) into ``directory`` atomically."""
        return save(self, directory, items)

    def items(self, card_path: str | Path) -> list[dict[str, Any]]:
        """The per-item rows stored beside ``card_path``."""
        return load_items(card_path, self)


def _adapter():
    from pydantic import TypeAdapter

    return TypeAdapter(Scorecard)


def json_schema() -> dict[str, Any]:
    return _adapter().json_schema()


def to_dict(card: Scorecard) -> dict[str, Any]:
    return asdict(card)


def from_dict(data: dict[str, Any]) -> Scorecard:
    """Validate and rebuild a scorecard; a wrong schema version or shape is a clear error."""
    from pydantic import ValidationError

    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise EtbenchError(f"scorecard schema version {version!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        return _adapter().validate_python(data, strict=False)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EtbenchError(f"invalid scorecard: {where}: {first['msg']} ({err.error_count()} problem(s))") from None


def save(card: Scorecard, directory: str | Path, items: list[dict[str, Any]] | None = None) -> Path:
    """Write ``scorecard.json`` (and the per-item side file) atomically; returns the JSON path."""
    directory = Path(directory)
    if items is not None:
        atomic_write_jsonl(directory / card.items_file, items)
    return atomic_write_json(directory / "scorecard.json", to_dict(card))


def load(path: str | Path) -> Scorecard:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EtbenchError(f"{path}: no such scorecard") from None
    except json.JSONDecodeError as err:
        raise EtbenchError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return from_dict(data)


def load_items(card_path: str | Path, card: Scorecard) -> list[dict[str, Any]]:
    """Per-item rows: {"measure", "model", "n_boxes", "group", "item", "correct", ...}."""
    return read_jsonl(Path(card_path).parent / card.items_file)


def canonical_bytes(card: Scorecard) -> bytes:
    return dumps_json(to_dict(card)).encode()
