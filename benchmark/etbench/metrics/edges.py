"""Edges between the circuit's head groups, and how far fine-tuning rewires them (docs/method.md §13).

Head overlap compares *nodes*; a fine-tune can keep the nodes and still route information between them
differently (Wang et al., ICML 2025). The paper's flow is D -> C -> B -> A -> logits (docs/method.md §3),
and its path patching already measures one hop of it per sender: step 2 patches the receivers' input
(B -> A: the value fetchers' query at the last token; C -> B and D -> C: the receivers' value at the
sender's position). With a single receiver, that is the effect of one **edge**:

    effect(s -> r) = mean_i (p_i - p_clean_i) / p_clean_i,   step 2 replacing only r's input

(``discovery.path_patching_edge_effects``). A value fetcher's edge goes to the logits: its node score.
Under grouped-query attention a value vector feeds every query head of its KV group, so a v receiver is
a (layer, KV head) *site*; a q receiver is a (layer, head).

Both models are scored on **one node set** (``edge_nodes``: each group's top heads of both circuits) and
the same prompts, so every edge has a score in each model. Per edge type, each model's **top edges**
are its ``k = ceil(top_fraction x M)`` edges of largest |effect| (M: the type's reachable edges; either
sign, as circuit growth orders heads). Then:

* ``overlap`` = |top_base ∩ top_ft| / k, ``rewiring`` = 1 - overlap; chance: the ft's top-k replaced by
  a random k-subset of the M edges (hypergeometric; the ``all`` row sums the types);
* ``base_edges_share``: on the fine-tuned model, the |effect| its base's top edges carry over the
  |effect| its own top edges carry (1 when the base's edges are the ft's strongest; a share of path
  effects, not an ablation faithfulness).

CIs are percentile bootstraps over the prompts (one draw for both models: the same items), 2,000
resamples; the node set, the noise pairs and k are held fixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from etbench.core.errors import EtbenchError
from etbench.core.io import Writer, atomic_write_json, claimed, refuse_foreign_files
from etbench.mech.forward import PassCounter
from etbench.mech.heads import head_map
from etbench.metrics.discovery import PAPER_CANDIDATE_K, default_k, discovery_pairs, path_patching_edge_effects
from etbench.metrics.edge_comparison import (  # noqa: F401 - re-exported: the comparison is this module's API too
    ALL,
    DEFAULT_TOP_FRACTION,
    EDGE_BATCH_SIZE,
    EDGE_BOXES,
    EDGE_TYPE_BY_NAME,
    EDGE_TYPES,
    Edge,
    EdgeComparison,
    EdgeOverlap,
    EdgeScores,
    EdgeType,
    check_edge_options,
    compare_edges,
    format_edge_comparison,
    head_of,
    nodes_of,
)
from etbench.models.load import as_loaded
from etbench.schema.circuit import GROUPS, Circuit, Head, group_name
from etbench.task.layout import pad_id_of


def edge_nodes(base: Circuit, ft: Circuit, k: Mapping[str, int] | int | None = None) -> dict[str, list[Head]]:
    """Per group, the union of both circuits' top ``k[g]`` heads (the base's first, in importance order).

    ``k`` defaults to the paper's candidate k scaled to the model (``discovery.default_k``: 15, 3, 7 and 2
    heads of SmolLM2-135M's 270). Sized circuits can hold most of a model's heads; edges among all of
    them would cost |A| x |B| patched runs per prompt batch, and the top heads carry the groups' roles."""
    return nodes_of(base, ft, default_node_k(base) if k is None else {g: k for g in GROUPS} if isinstance(k, int)
                    else k)


def default_node_k(circuit: Circuit) -> dict[str, int]:
    """The node k per group for a circuit's model: the paper's candidate k scaled to its head count."""
    if None in (circuit.n_layers, circuit.n_heads):
        raise EtbenchError("edge nodes need circuits that record their model's shape (n_layers, n_heads)")
    return default_k(circuit.n_layers * circuit.n_heads, PAPER_CANDIDATE_K)


def edge_scores(model, nodes: Mapping[str, Sequence[Sequence[int]]], tokenizer=None, *, n_boxes: int = 7,
                n: int = 32, seed: int = 0, batch_size: int = 8, types: Sequence[str] | None = None,
                prefix_cache: bool = True, model_name: str = "", progress: bool = False) -> EdgeScores:
    """Score every reachable edge between ``nodes`` (``{group: heads}``) on ``model`` (a loaded model +
    ``tokenizer``, a ``LoadedModel`` or a registry ref), on the first ``n`` items of seed ``seed`` and their
    noise pairs (the discovery prompts of that seed). ``types``: the edge types to score (default all).

    Cost: one sender run per sender and one receiver run per edge, per batch. A run recomputes the tokens
    from the batch's earliest sender position on, so items are batched in order of that position (D's
    previous query label ranges over the whole context; C and B sit near the end)."""
    types = check_edge_options(n=n, types=types)
    model, tokenizer, model_name = as_loaded(model, tokenizer, model_name)
    hm = head_map(model)
    spec = hm.spec
    node_heads = {group_name(g): [head_of(tuple(int(v) for v in h)) for h in hs] for g, hs in nodes.items()}
    for g, hs in node_heads.items():
        for layer, head in hs:
            if not (0 <= layer < spec.n_layers and 0 <= head < spec.n_heads):
                raise EtbenchError(f"{g} node L{layer}H{head} is not a head of this model "
                                   f"({spec.n_layers} layers x {spec.n_heads} heads)")
    _, _, _, encoded = discovery_pairs(tokenizer, n_boxes, n, seed)
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].base_layout.position("prev_query_label"))
    chosen = [EDGE_TYPE_BY_NAME[t] for t in types]
    senders = {t.sender: node_heads.get(t.sender, []) for t in chosen}
    receivers = {t.sender: node_heads.get(t.receiver, []) for t in chosen if t.receiver is not None}
    counter = PassCounter()
    effects = path_patching_edge_effects(model, hm, [encoded[i] for i in order], senders, receivers, batch_size,
                                         pad_id_of(tokenizer), counter, prefix_cache, progress)
    edges = []
    for t in EDGE_TYPES:
        if t not in chosen:
            continue
        for (sender, site), sorted_items in sorted(effects.get(t.sender, {}).items(),
                                                   key=lambda kv: (kv[0][0], kv[0][1] or (-1, -1))):
            per_item = [0.0] * len(order)
            for j, i in enumerate(order):  # back to the items' own order
                per_item[i] = sorted_items[j]
            edges.append(Edge(t.name, sender, site, per_item))
    params = {"n_boxes": n_boxes, "n": n, "seed": seed, "batch_size": batch_size, "types": types,
              "score": "mean relative change of p(answer), path-patched through one receiver",
              "v_receivers": "KV-head sites" if spec.n_kv_heads != spec.n_heads else "heads",
              "kv_group_size": spec.group_size}
    return EdgeScores(model_name, node_heads, edges, len(encoded), params, counter.as_dict())


# ---------------------------------------------------------------------------------------------- files


#: ``etbench edges``' files in its output directory, and its manifest there (the ownership rule of core.io).
EDGES_WRITER = Writer("etbench edges", ".etbench-edges-manifest.json")
EDGE_OUTPUTS = ("edges_base.json", "edges_ft.json", "edge_comparison.json")


def check_edge_outputs(out_dir: str | Path) -> None:
    """Refuse, before any model loads, an output directory holding a file of an output's name that
    ``etbench edges`` did not write."""
    refuse_foreign_files(Path(out_dir), dict.fromkeys(EDGE_OUTPUTS), EDGES_WRITER)


def write_edges(out_dir: str | Path, base: EdgeScores, ft: EdgeScores, cmp: EdgeComparison) -> list[Path]:
    """The three files, each written atomically, claimed in the manifest as ``accuracy.write_run`` claims its
    own (core.io.claimed: a failed write puts the manifest back)."""
    out_dir = Path(out_dir)
    with claimed(out_dir, EDGE_OUTPUTS, EDGES_WRITER):
        return [atomic_write_json(out_dir / name, obj.to_dict()) for name, obj in zip(EDGE_OUTPUTS, (base, ft, cmp))]


def compare_models(base, ft, circuit_base: Circuit, circuit_ft: Circuit, *, k: Mapping[str, int] | int | None = None,
                   n_boxes: int = 7, n: int = 32, seed: int = 0, batch_size: int = 8,
                   types: Sequence[str] | None = None, top_fraction: float = DEFAULT_TOP_FRACTION,
                   progress: bool = False) -> tuple[EdgeScores, EdgeScores, EdgeComparison]:
    """Both models' edge scores on the node set of the two circuits (``edge_nodes``), and their comparison.
    ``base``/``ft``: ``LoadedModel``s or registry refs."""
    types = check_edge_options(n=n, types=types, top_fraction=top_fraction)
    nodes = edge_nodes(circuit_base, circuit_ft, k)
    kw = dict(n_boxes=n_boxes, n=n, seed=seed, batch_size=batch_size, types=types, progress=progress)
    scores_base = edge_scores(base, nodes, **kw)
    scores_ft = edge_scores(ft, nodes, **kw)
    return scores_base, scores_ft, compare_edges(scores_base, scores_ft, top_fraction=top_fraction, seed=seed)
