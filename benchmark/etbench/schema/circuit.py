"""Entity-tracking circuits: the typed model, its JSON file format and the shipped circuits (no torch:
publishing and the scorecard schema read circuits without loading a model; discovery lives in
``etbench.metrics.discovery``).

A circuit is a set of **nodes** ``(group, layer, head)``; the group fixes the token position the head
is kept at (docs/method.md §3):

==========================  =====  ====================  =========================================
group                        code   position class        role
==========================  =====  ====================  =========================================
``value_fetcher``            A      ``last``              copies the queried object to the output
``position_transmitter``     B      ``last``              moves the query's position to the last token
``position_detector``        C      ``query_label``       finds where the query label was in the context
``structure_reader``         D      ``prev_query_label``  reads structure at the label's earlier copy
==========================  =====  ====================  =========================================

A head may sit in several groups (the paper's Llama circuit: 72 nodes, 67 distinct heads). Within a
group, heads are kept in importance order (most important first), and each may carry its discovery
score (the mean relative change of the correct token's probability when the head is path-patched;
more negative = more important).

File format (``schema_version`` 1, canonical JSON)::

    {"format": "etbench-circuit", "schema_version": 1,
     "model": {"name": "llama7b", "n_layers": 32, "n_heads": 32},
     "method": {"name": "paper" | "path_patching" | "attribution+path_patching" | ..., "parameters": {...}},
     "groups": {"value_fetcher": {"position": "last", "heads": [[15, 13], ...], "scores": [-0.085, ...] | null},
                ... all four groups, possibly empty ...},
     "stats": {...}, "notes": ""}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from etbench.core.errors import EtbenchError
from etbench.core.io import atomic_write_json, finite, jsonable

SCHEMA_VERSION = 1
FORMAT = "etbench-circuit"

#: One attention head: (layer, head index within the layer).
Head = tuple[int, int]

#: How a circuit can be discovered: exact path patching, or an attribution screen + exact verification.
DISCOVERY_MODES: tuple[str, ...] = ("exact", "fast")

#: How a discovered circuit's size is chosen: the paper's top-k per group, or grown to a target fraction of
#: the circuit form's faithfulness ceiling (``metrics.discovery.discover(size=...)``).
SIZE_RULES: tuple[str, ...] = ("top-k", "faithfulness")


def check_sizing(size: str, target_fraction: float) -> None:
    """A size rule and target fraction ``discover`` accepts; here (no torch) so that a command or a preset is
    refused before any model loads."""
    if size not in SIZE_RULES:
        raise EtbenchError(f"circuit size rule must be one of {', '.join(SIZE_RULES)}, got {size!r}")
    if size == "faithfulness" and not 0 < target_fraction <= 1:
        raise EtbenchError(f"target fraction must be in (0, 1], got {target_fraction}")

#: Token positions a head can be kept at (``Layout.position`` classes).
POSITION_CLASSES: tuple[str, ...] = ("last", "query_label", "prev_query_label")

#: The four groups in the paper's search order (A, B, C, D).
GROUPS: tuple[str, ...] = ("value_fetcher", "position_transmitter", "position_detector", "structure_reader")
GROUP_CODES: dict[str, str] = dict(zip(GROUPS, "ABCD"))
#: Where each group's heads are kept (a ``Layout.position`` class).
GROUP_POSITION: dict[str, str] = {
    "value_fetcher": "last",
    "position_transmitter": "last",
    "position_detector": "query_label",
    "structure_reader": "prev_query_label",
}
assert set(GROUP_POSITION.values()) == set(POSITION_CLASSES)

#: The paper's circuits shipped as package data (``assets/circuits/<name>.json``).
PAPER_CIRCUITS: dict[str, str] = {
    "llama7b": "Llama-7B circuit (72 nodes), found on LLaMA-1 7B",
    "goat7b": "Goat-7B circuit (175 nodes), found on Goat-7B (LLaMA-7B + LoRA)",
    "float7b": "FLoat-7B circuit (175 nodes), found on FLoat-7B (fully fine-tuned LLaMA-7B)",
}


def group_name(group: str) -> str:
    """Accept a group name or its letter (A-D, any case); return the name."""
    if group in GROUP_POSITION:
        return group
    by_code = {c.lower(): g for g, c in GROUP_CODES.items()}
    if isinstance(group, str) and group.lower() in by_code:
        return by_code[group.lower()]
    raise EtbenchError(f"unknown circuit group {group!r}; known: {', '.join(GROUPS)} (or A, B, C, D)")


@dataclass(frozen=True, order=True)
class Node:
    """One circuit node: head ``head`` of layer ``layer``, kept at its group's position class.

    ``score`` (optional, the discovery score) does not take part in equality or hashing."""

    group: str
    layer: int
    head: int
    score: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group", group_name(self.group))
        for name in ("layer", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EtbenchError(f"circuit node {name} must be a non-negative integer, got {value!r}")

    @property
    def position_class(self) -> str:
        return GROUP_POSITION[self.group]

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.group, self.layer, self.head)

    def __str__(self) -> str:
        return f"{GROUP_CODES[self.group]}:L{self.layer}H{self.head}"


def heads_by_position(nodes: Iterable[Node]) -> dict[str, set[tuple[int, int]]]:
    """``{position class: {(layer, head)}}`` of some nodes (every class present, possibly empty)."""
    out: dict[str, set[tuple[int, int]]] = {p: set() for p in POSITION_CLASSES}
    for n in nodes:
        out[n.position_class].add((n.layer, n.head))
    return out


@dataclass(frozen=True)
class Circuit:
    """Nodes per group (each group in importance order) and where they came from."""

    groups: Mapping[str, tuple[Node, ...]]
    model: str = ""  # the model the circuit was found on (an alias, hub id or path)
    n_layers: int | None = None  # that model's shape, when known
    n_heads: int | None = None
    method: str = "manual"
    parameters: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)  # e.g. forward passes and wall time of discovery
    notes: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        groups: dict[str, tuple[Node, ...]] = {}
        for g, nodes in dict(self.groups).items():
            name = group_name(g)
            if name in groups:
                raise EtbenchError(f"circuit group {name} given twice")
            nodes = tuple(nodes)
            for n in nodes:
                if n.group != name:
                    raise EtbenchError(f"node {n} listed under group {name}")
            seen: set = set()
            for n in nodes:
                if n.key in seen:
                    raise EtbenchError(f"circuit group {name} lists head L{n.layer}H{n.head} twice")
                seen.add(n.key)
            groups[name] = nodes
        object.__setattr__(self, "groups", {g: groups.get(g, ()) for g in GROUPS})
        object.__setattr__(self, "parameters", dict(self.parameters))
        object.__setattr__(self, "stats", dict(self.stats))
        if self.n_layers is not None or self.n_heads is not None:
            self.validate(self.n_layers, self.n_heads, what="the model it was found on")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_heads(cls, heads: Mapping[str, Iterable[Sequence[int]]], scores: Mapping[str, Sequence[float]] | None = None,
                   **kwargs) -> Circuit:
        """From ``{group: [[layer, head], ...]}`` (groups by name or letter), optional aligned scores."""
        groups = {}
        for g, pairs in heads.items():
            name = group_name(g)
            pairs = [tuple(p) for p in pairs]
            sc = None if scores is None else (scores.get(name) if name in scores else scores.get(g))
            if sc is not None and len(sc) != len(pairs):
                raise EtbenchError(f"group {name}: {len(pairs)} heads but {len(sc)} scores")
            for p in pairs:
                if len(p) != 2:
                    raise EtbenchError(f"group {name}: a head must be [layer, head], got {list(p)}")
            groups[name] = tuple(Node(name, int(layer), int(head), None if sc is None else float(sc[i]))
                                 for i, (layer, head) in enumerate(pairs))
        return cls(groups, **kwargs)

    # -- views ----------------------------------------------------------------------------------

    def nodes(self, group: str | None = None) -> tuple[Node, ...]:
        if group is not None:
            return self.groups[group_name(group)]
        return tuple(n for g in GROUPS for n in self.groups[g])

    def heads(self, group: str) -> list[tuple[int, int]]:
        """``[(layer, head), ...]`` of one group, in importance order."""
        return [(n.layer, n.head) for n in self.groups[group_name(group)]]

    @property
    def size(self) -> int:
        """Number of nodes (a head in two groups counts twice, as the paper counts)."""
        return sum(len(v) for v in self.groups.values())

    @property
    def group_sizes(self) -> dict[str, int]:
        return {g: len(self.groups[g]) for g in GROUPS}

    @property
    def distinct_heads(self) -> set[tuple[int, int]]:
        return {(n.layer, n.head) for n in self.nodes()}

    def kept(self) -> dict[str, set[tuple[int, int]]]:
        """``{position class: {(layer, head)}}``: which heads keep their own z at which position."""
        return heads_by_position(self.nodes())

    def __contains__(self, node: object) -> bool:
        return isinstance(node, Node) and node in self.groups[node.group]

    # -- editing --------------------------------------------------------------------------------

    def with_groups(self, groups: Mapping[str, Iterable[Node]], **changes) -> Circuit:
        """A copy with some groups replaced (other fields unchanged unless given)."""
        new = dict(self.groups)
        for g, nodes in groups.items():
            new[group_name(g)] = tuple(nodes)
        return replace(self, groups=new, **changes)

    def without(self, nodes: Iterable[Node]) -> Circuit:
        drop = {n.key for n in nodes}
        return self.with_groups({g: [n for n in self.groups[g] if n.key not in drop] for g in GROUPS})

    def top(self, k: Mapping[str, int] | int) -> Circuit:
        """The first ``k`` nodes of each group (an int applies to every group)."""
        ks = {g: k for g in GROUPS} if isinstance(k, int) else {group_name(g): v for g, v in k.items()}
        return self.with_groups({g: self.groups[g][: ks.get(g, len(self.groups[g]))] for g in GROUPS})

    # -- validation -----------------------------------------------------------------------------

    def validate(self, n_layers: int | None, n_heads: int | None, what: str = "this model") -> None:
        """Raise a clear error when a node's layer or head does not exist in a model of this shape."""
        bad = [n for n in self.nodes()
               if (n_layers is not None and n.layer >= n_layers) or (n_heads is not None and n.head >= n_heads)]
        if bad:
            shown = ", ".join(str(n) for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise EtbenchError(
                f"circuit {self.model or '(unnamed)'} does not fit {what} ({n_layers} layers x {n_heads} heads): "
                f"{shown} out of range"
            )

    def check_model(self, spec) -> None:
        """Validate against a ``heads.HeadSpec`` (or anything with n_layers / n_heads)."""
        self.validate(spec.n_layers, spec.n_heads)

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        groups = {}
        for g in GROUPS:
            nodes = self.groups[g]
            scores = [n.score for n in nodes]
            groups[g] = {
                "position": GROUP_POSITION[g],
                "heads": [[n.layer, n.head] for n in nodes],
                "scores": None if any(s is None for s in scores) or not nodes else [finite(s) for s in scores],
            }
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "model": {"name": self.model, "n_layers": self.n_layers, "n_heads": self.n_heads},
            "method": {"name": self.method, "parameters": jsonable(self.parameters)},
            "groups": groups,
            "stats": jsonable(self.stats),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "circuit") -> Circuit:
        if not isinstance(data, Mapping):
            raise EtbenchError(f"{source}: not a circuit (expected a JSON object)")
        if data.get("format") != FORMAT:
            raise EtbenchError(f"{source}: not an etbench circuit file (format is {data.get('format')!r}, "
                               f"expected {FORMAT!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise EtbenchError(f"{source}: circuit schema_version {version!r} is not supported "
                               f"(this etbench reads version {SCHEMA_VERSION})")
        unknown_groups = set(data.get("groups", {})) - set(GROUPS)
        if unknown_groups:
            raise EtbenchError(f"{source}: unknown groups {sorted(unknown_groups)}; known: {', '.join(GROUPS)}")
        heads, scores = {}, {}
        for g, body in data.get("groups", {}).items():
            if not isinstance(body, Mapping) or "heads" not in body:
                raise EtbenchError(f"{source}: group {g} needs a 'heads' list")
            if body.get("position", GROUP_POSITION[g]) != GROUP_POSITION[g]:
                raise EtbenchError(f"{source}: group {g} must sit at position {GROUP_POSITION[g]!r}, "
                                   f"not {body.get('position')!r}")
            for p in body["heads"]:
                if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p)):
                    raise EtbenchError(f"{source}: group {g}: a head must be [layer, head] integers, got {p!r}")
            heads[g] = body["heads"]
            if body.get("scores") is not None:
                scores[g] = [float("nan") if s is None else s for s in body["scores"]]
        model = data.get("model", {}) or {}
        method = data.get("method", {}) or {}
        try:
            return cls.from_heads(
                heads, scores, model=model.get("name", "") or "", n_layers=model.get("n_layers"),
                n_heads=model.get("n_heads"), method=method.get("name", "manual"),
                parameters=method.get("parameters", {}) or {}, stats=data.get("stats", {}) or {},
                notes=data.get("notes", "") or "",
            )
        except EtbenchError as err:
            raise EtbenchError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        path = Path(path)
        if path.is_dir():
            raise EtbenchError(f"circuit {path} is a directory; give a circuit JSON file")
        if not path.is_file():
            raise EtbenchError(f"circuit file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EtbenchError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        return cls.from_dict(data, source=str(path))

    def summary(self) -> str:
        sizes = ", ".join(f"{GROUP_CODES[g]} {len(self.groups[g])}" for g in GROUPS)
        return f"{self.size} nodes ({len(self.distinct_heads)} distinct heads): {sizes}"


#: Other circuits shipped as package data: found by etbench on the embedded models.
SHIPPED_CIRCUITS: dict[str, str] = {
    "tiny-base": "found on tiny-base by the standard preset's circuit stage: `discover(mode='fast', n=32, "
                 "size='faithfulness')`, grown to 0.9 x the form's ceiling, no minimality pruning",
}


def load_circuit(ref: str | Path) -> Circuit:
    """A circuit file path, or a shipped name: ``paper:<name>`` / bare ``llama7b``, ``goat7b``,
    ``float7b``, or ``tiny-base``."""
    text = str(ref)
    name = text[len("paper:"):] if text.startswith("paper:") else text
    if not Path(text).exists():
        if name in PAPER_CIRCUITS:
            return paper_circuit(name)
        if name in SHIPPED_CIRCUITS:
            body = resources.files("etbench").joinpath(f"assets/circuits/{name}.json").read_text(encoding="utf-8")
            return Circuit.from_dict(json.loads(body), source=f"shipped circuit {name}")
    return Circuit.load(ref)


def paper_circuit(name: str) -> Circuit:
    """One of the paper's final circuits (``llama7b``, ``goat7b``, ``float7b``), with its path-patching
    scores; apply it to any Llama-7B-shaped model (32 layers x 32 heads)."""
    aliases = {"llama": "llama7b", "goat": "goat7b", "float": "float7b"}
    key = aliases.get(name.lower(), name.lower())
    if key not in PAPER_CIRCUITS:
        raise EtbenchError(f"unknown paper circuit {name!r}; shipped: {', '.join(PAPER_CIRCUITS)}")
    text = resources.files("etbench").joinpath(f"assets/circuits/{key}.json").read_text(encoding="utf-8")
    return Circuit.from_dict(json.loads(text), source=f"paper circuit {key}")
