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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from etbench.core.errors import EtbenchError
from etbench.core.io import atomic_write_json, atomic_write_jsonl, config_hash, dumps_json, nonfinite_paths, read_jsonl
from etbench.core.stats import Estimate
from etbench.schema.circuit import GROUPS

__all__ = ["Estimate", "GROUPS", "config_hash"]  # re-exported: the types every score is built from

#: 2: model sources are published forms (no local paths) and weights revisions are recorded (issue #14);
#: ceilings of the circuit form per model, MIB-normalised faithfulness, circuit sizing records, CMAP rows
#: labelled by head set, overlap of single discoveries without a fake CI (issue #12). Version 1 is still
#: read (reports, comparisons, the stored leaderboard) but not submitted.
#: 3: every published number is re-derivable or absent (issue #26): per-draw random-circuit rows and per-prompt
#: sizing rows in the items file; a number a card cannot re-derive (a card converted from version 2) is null and
#: listed in ``absent`` with the reason. Submit requires version 3.
#: 4: the ``edges`` section (edge overlap and rewiring between the circuits, docs/method.md §13) with its per-prompt
#: ``edge_effect`` rows, and ``provenance.added`` (sections added to a card after it was scored). A card of
#: version 3 simply has no ``edges``: it still validates, submits and ranks (its rewiring shows as absent).
SCHEMA_VERSION = 4
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
#: Versions ``etbench submit`` accepts: 3 (no edges) and 4.
SUBMITTABLE_SCHEMA_VERSIONS = (3, 4)
#: Bump when prompts, metrics or presets change meaning: scorecards of another version are not comparable.
#: 1.1: circuits grown by size of effect (scaled-shape growth), the ``standard`` preset (issues #12, #13).
BENCHMARK_VERSION = "1.1"


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
    size_rule: str = "top-k"  # "top-k" (the paper's k per group), "faithfulness" (grown to a target), "given"
    # size_rule "faithfulness": target, whether it was reached, the chosen top-k per group and the growth
    # curve (the record of the search), measured on the sizing prompts (see docs/method.md)
    sizing: Optional[dict[str, Any]] = None


@dataclass
class FaithfulnessScore:
    circuit: str  # CircuitSummary.name
    model: Literal["base", "ft"]
    model_accuracy: Estimate
    circuit_accuracy: Estimate
    faithfulness: Estimate  # circuit acc / model acc (the paper's ratio)
    # same group sizes, mean over draws (n = draws); null and listed in ``Scorecard.absent`` when the card has no
    # per-draw rows to re-derive it from (converted from schema 2)
    random_circuit_accuracy: Estimate
    # MIB's (m(C) - m(none)) / (m(N) - m(none)), m(none) = every head meaned (the CeilingScore floor)
    faithfulness_mib: Optional[Estimate] = None


@dataclass
class CeilingScore:
    """What any circuit of one form can reach on one model: the same prompts and mean as the
    faithfulness rows of that model."""

    model: Literal["base", "ft"]
    form: str  # "paper": A/B at the last token, C at the query label, D at its earlier copy
    model_accuracy: Estimate  # no edits
    every_head_every_position: Estimate  # through the ablation edits, nothing meaned: equals model_accuracy
    form_accuracy: Estimate  # every head kept at the form's position classes, everything else meaned
    no_heads_accuracy: Estimate  # every head meaned everywhere (the floor)
    form_faithfulness: Estimate  # form_accuracy / model_accuracy, paired bootstrap CI
    form_faithfulness_mib: Estimate  # (form - floor) / (model - floor)


@dataclass
class OverlapChance:
    """What the overlap would be by chance: the fine-tuned set replaced by a uniformly random set of the
    same size drawn from ``pool`` heads (hypergeometric). An overlap is evidence of a shared mechanism
    only above this: a fine-tuned group grown to most of the model's heads contains most base heads
    whatever they are."""

    pool: int  # heads a set is drawn from (every head of the model)
    base_in_ft: float  # expected |base ∩ random| / |base| = |ft| / pool
    jaccard: float  # expected Jaccard of base and the random set
    p_value: float  # P(|base ∩ random| >= observed |base ∩ ft|): one-sided, overlap above chance
    method: str = "hypergeometric"


@dataclass
class OverlapScore:
    """Base heads recovered in the fine-tuned model's set, for one group or "all"."""

    # "circuit": the two circuits as found; "circuit-top": the top k = min(|base|, |ft|) heads of each
    # circuit's group ranking (equal sizes, comparable across rows whose circuits were sized apart);
    # "dcm": DCM-selected heads
    heads: Literal["circuit", "circuit-top", "dcm"]
    group: str  # a GROUPS name or "all"
    base_in_ft: Estimate  # |base ∩ ft| / |base|
    jaccard: Estimate
    # circuit and circuit-top rows: the chance level of both figures (None for DCM rows, whose sets are drawn from each
    # model's own circuit group, and for cards written before it was kept)
    chance: Optional[OverlapChance] = None


@dataclass
class CmapScore:
    """Fine-tuned activations patched into the base model (Cross-Model Activation Patching)."""

    variant: str  # "output" (head z), or input variants "q", "k", "v", "qk", "qkv"
    group: str  # a GROUPS name or "full"
    patched_accuracy: Estimate
    gain: Estimate  # patched - base accuracy (paired CI)
    normalised_gain: Estimate  # (patched - base) / (ft - base); value None when the ft - base CI contains 0
    # which fine-tuned heads were patched: "dcm" (the paper's rule: A = DCM object-value heads, B and C =
    # DCM positional heads, D = the whole group) or "circuit" (every head of the ft circuit's groups)
    heads: str = "dcm"


@dataclass
class DcmScore:
    circuit: str
    group: str
    desideratum: str
    selected_heads: list[list[int]]
    test_accuracy: Estimate


@dataclass
class DcmSelection:
    """The heads one DCM seed selected on one circuit for one (group, desideratum): the inputs of the DCM
    head overlap over seeds, so that it can be recomputed from the scorecard."""

    circuit: Literal["base", "ft"]
    seed: int  # the DCM seed (an entry of the preset's ``dcm_seeds``)
    group: str
    desideratum: str
    selected_heads: list[list[int]]


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
class AbsentNumber:
    """A number this card does not publish because nothing it carries re-derives it (``where``: the field, as
    ``etbench submit`` names it; ``reason``: why). Its value on the card is null."""

    where: str
    reason: str


@dataclass
class EdgeTypeScore:
    """One edge type (``C->B``, ``B->A``, ``A->logits``, ``D->C``) or ``all`` of them: the base's top edges
    recovered among the fine-tuned model's (docs/method.md §13)."""

    type: str
    n_candidates: int  # M: reachable edges of this type between the node set
    k: int  # top edges per model: ceil(top_fraction x M)
    n_common: int
    overlap: Estimate  # n_common / k
    rewiring: Estimate  # 1 - overlap
    chance: Optional[OverlapChance]  # the fine-tuned top k replaced by a random k of the M (hypergeometric)
    base_edges_share: Estimate  # on the ft: |effect| of the base's top edges / |effect| of its own


@dataclass
class EdgesScore:
    """Edges between the two circuits' groups, scored by path patching on both models on one node set
    (``nodes``: each group's top ``node_k`` heads of both circuits, base first) and the first ``n`` discovery
    prompts of ``seed``; the per-prompt effects are the items file's ``edge_effect`` rows."""

    types: list[str]  # edge types scored, upstream first
    n: int  # prompts
    seed: int
    n_boxes: int
    batch_size: int
    top_fraction: float
    n_resamples: int
    node_k: dict[str, int]  # group -> k of ``metrics.edges.edge_nodes``
    nodes: dict[str, list[list[int]]]  # group -> [[layer, head], ...]
    kv_group_size: int  # query heads per KV head: a v receiver is a (layer, KV head) site
    rows: list[EdgeTypeScore]


@dataclass
class AddedSection:
    """A section added to a card after it was scored (``etbench submit --add-edges``), from the card's own
    models, circuits and seed."""

    section: str
    etbench_version: str
    libraries: dict[str, str]
    device: str
    dtype: str


@dataclass
class Provenance:
    etbench_version: str
    benchmark_version: str
    libraries: dict[str, str]  # torch, transformers, lm-eval, ... versions
    device: str
    dtype: str
    added: list[AddedSection] = field(default_factory=list)  # schema 4: sections computed later, by whom


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
    ceilings: list[CeilingScore] = field(default_factory=list)
    overlap: list[OverlapScore] = field(default_factory=list)
    dcm: list[DcmScore] = field(default_factory=list)
    cmap: list[CmapScore] = field(default_factory=list)
    semantics: list[SemanticsScore] = field(default_factory=list)
    # every DCM seed's selections (``dcm`` keeps the first seed's only); None in a card written before they
    # were kept, whose DCM overlap over seeds ``etbench submit`` cannot re-derive (so refuses)
    dcm_selections: Optional[list[DcmSelection]] = None
    # schema 4: edges between the circuits' groups (None: not scored, as in every card of schema <= 3, or a
    # preset that scores no edges)
    edges: Optional[EdgesScore] = None
    limit: Optional[int] = None  # set when a run was truncated for a smoke test: never on a leaderboard
    # numbers left out because nothing on the card re-derives them (schema 3; see ``AbsentNumber``)
    absent: list[AbsentNumber] = field(default_factory=list)
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

    if not isinstance(data, dict):  # its schema version read as None: say what it is instead
        raise EtbenchError(f"not a scorecard (a JSON object), got {type(data).__name__}")
    version = data.get("schema_version")
    if type(version) is not int or version not in READABLE_SCHEMA_VERSIONS:  # True == 1 and 2.0 == 2
        raise EtbenchError(f"scorecard schema version {version!r} is not supported "
                           f"(readable: {', '.join(map(str, READABLE_SCHEMA_VERSIONS))})")
    _check_box_counts(data)
    try:
        card = _adapter().validate_python(data, strict=False)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EtbenchError(f"invalid scorecard: {where}: {first['msg']} ({err.error_count()} problem(s))") from None
    _check_head_pairs(card)
    return card


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_box_counts(data: dict[str, Any]) -> None:
    """Every accuracy entry's ``n_boxes`` is a JSON integer. Checked before pydantic, whose lax mode would
    turn "7" or 7.0 into 7: a box count is matched exactly against the per-item rows' (``check_items``)."""
    accuracy = data.get("accuracy")
    for i, entry in enumerate(accuracy if isinstance(accuracy, list) else []):
        if isinstance(entry, dict) and "n_boxes" in entry and not _is_int(entry["n_boxes"]):
            raise EtbenchError(f"invalid scorecard: accuracy.{i}.n_boxes: must be an integer (a box count), "
                               f"got {entry['n_boxes']!r}")


def _check_head_pairs(card: Scorecard) -> None:
    """Every head is a [layer, head] pair (the type says a list of ints; readers unpack two)."""
    lists = [(f"circuits.{i}.heads.{g}", hs) for i, c in enumerate(card.circuits) for g, hs in c.heads.items()]
    lists += [(f"dcm.{i}.selected_heads", d.selected_heads) for i, d in enumerate(card.dcm)]
    lists += [(f"dcm_selections.{i}.selected_heads", d.selected_heads) for i, d in enumerate(card.dcm_selections or [])]
    lists += [(f"semantics.{i}.heads", s.heads) for i, s in enumerate(card.semantics)]
    if card.edges is not None:
        lists += [(f"edges.nodes.{g}", hs) for g, hs in card.edges.nodes.items()]
    for where, heads in lists:
        for j, head in enumerate(heads):
            if len(head) != 2:
                raise EtbenchError(f"invalid scorecard: {where}.{j}: a head is [layer, head], got {head!r}")


def save(card: Scorecard, directory: str | Path, items: list[dict[str, Any]] | None = None) -> Path:
    """Write ``scorecard.json`` (and the per-item side file) atomically; returns the JSON path."""
    directory = Path(directory)
    if items is not None:
        atomic_write_jsonl(directory / card.items_file, items)
    return atomic_write_json(directory / "scorecard.json", to_dict(card))


def load(path: str | Path) -> Scorecard:
    """Read and validate ``scorecard.json``; anything unreadable, corrupt or non-finite is one error naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EtbenchError(f"{path}: no such scorecard") from None
    except OSError as err:
        raise EtbenchError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        data = json.loads(raw.decode("utf-8"))  # NaN is parsed here only to say where it is, below
    except UnicodeDecodeError:
        raise EtbenchError(f"{path}: not UTF-8 text (a corrupt scorecard)") from None
    except json.JSONDecodeError as err:
        raise EtbenchError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}; truncated or corrupt)") from None
    except RecursionError:
        raise EtbenchError(f"{path}: JSON nested too deeply (not a scorecard)") from None
    bad = nonfinite_paths(data)
    if bad:
        raise EtbenchError(f"{path}: non-finite number (NaN/Infinity, not valid JSON) at {', '.join(bad[:3])}")
    try:
        return from_dict(data)
    except EtbenchError as err:
        raise EtbenchError(f"{path}: {err}") from None


#: Fields that identify one per-item row; two rows with the same values are a duplicate.
ITEM_KEY = ("measure", "model", "circuit", "heads", "group", "variant", "desideratum", "ablation", "layer", "head",
            "n_boxes", "draw", "point", "edge", "receiver", "item")
#: Measures whose rows carry a number ``score`` (or null where it was not finite) instead of ``correct``.
SCORE_MEASURES = ("discovery_score", "edge_effect")


def check_items(items: list[dict[str, Any]]) -> None:
    """Per-item rows are well formed: ``correct`` a bool, ``item`` an int, ``n_boxes`` an int (required on
    accuracy rows), no row twice. Readers select rows by exact field values: an ``n_boxes`` of "7" matched
    no box count, and its rows silently left the paired tests."""
    seen = set()
    for number, row in enumerate(items, 1):
        if row.get("measure") in SCORE_MEASURES:
            score = row.get("score", "absent")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                      or not math.isfinite(score)):
                raise EtbenchError(f"items line {number}: 'score' must be a finite number or null, got {score!r}")
        elif not isinstance(row.get("correct"), bool):
            raise EtbenchError(f"items line {number}: 'correct' must be true or false, got {row.get('correct')!r}")
        item = row.get("item")
        if not _is_int(item):
            raise EtbenchError(f"items line {number}: 'item' must be an integer, got {item!r}")
        boxes = row.get("n_boxes")
        if (row.get("measure") == "accuracy" or boxes is not None) and not _is_int(boxes):
            raise EtbenchError(f"items line {number}: 'n_boxes' must be an integer, got {boxes!r}")
        key = tuple(repr(row.get(k)) for k in ITEM_KEY)
        if key in seen:
            raise EtbenchError(f"items line {number}: duplicate row (item {item} of {row.get('measure')})")
        seen.add(key)


def items_path(card_path: str | Path, card: Scorecard, where: str | Path | None = None) -> Path:
    """The card's per-item rows file: ``items_file`` must be a plain file name next to the scorecard (never
    ``../other`` or an absolute path). ``where`` names the input in the error (default: the card)."""
    name = card.items_file
    if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
        raise EtbenchError(f"{where or card_path}: items_file {name!r} must be a plain file name next to the "
                           "scorecard")
    return Path(card_path).parent / name


def load_items(card_path: str | Path, card: Scorecard) -> list[dict[str, Any]]:
    """Per-item rows: {"measure", "model", "n_boxes", "group", "item", "correct", ...}, checked
    (``check_items``): a ``correct`` of "no" would count as correct, an unhashable ``item`` break pairing."""
    path = items_path(card_path, card)
    rows = read_jsonl(path, "per-item rows")
    try:
        check_items(rows)
    except EtbenchError as err:
        raise EtbenchError(f"{path}: {err}") from None
    return rows


def canonical_bytes(card: Scorecard) -> bytes:
    return dumps_json(to_dict(card)).encode()


#: Config keys that say which models were scored, not how: two scorecards that differ only here (two
#: fine-tunes of one base, or of two bases) were scored under the same protocol, on the same items.
MODEL_KEYS = ("base", "ft")
#: Preset fields that shape only the ``edges`` section, which records them itself: two cards that differ only
#: here (one scored before edges existed) compare on every other number.
EDGE_PRESET_FIELDS = ("edge_types", "edge_n")


def protocol(card: Scorecard) -> dict[str, Any]:
    """How a scorecard was made: benchmark version, preset (sizes), seed, dtype, DCM settings, how the
    circuits were found; everything in its config except which models were scored."""
    out = {k: v for k, v in card.config.items() if k not in MODEL_KEYS}
    if isinstance(out.get("preset"), dict):
        out["preset"] = {k: v for k, v in out["preset"].items() if k not in EDGE_PRESET_FIELDS}
    out["benchmark_version"] = card.provenance.benchmark_version
    return out


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def protocol_differences(a: Scorecard, b: Scorecard) -> list[str]:
    """Why two scorecards are not comparable (``preset.accuracy_n 100 vs 500``), or [] when they are."""
    fa, fb = _flat(protocol(a)), _flat(protocol(b))
    out = []
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            name = key.replace("benchmark_version", "benchmark version")
            out.append(f"{name} {fa.get(key, '(absent)')!r} vs {fb.get(key, '(absent)')!r}")
    return out
