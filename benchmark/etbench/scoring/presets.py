"""Scoring presets: the size of every stage of a scorecard run. The preset (and the DCM configuration it
names) is recorded in every scorecard's config, so a scorecard says exactly how it was made."""

from __future__ import annotations

from dataclasses import dataclass, replace

from etbench.core.errors import EtbenchError
from etbench.schema.circuit import DISCOVERY_MODES, check_sizing

DEFAULT_BASE, DEFAULT_FT = "tiny-base", "tiny-ft"


@dataclass(frozen=True)
class Preset:
    """Sizes of every stage. ``quick`` is sized for a 2-core CPU, ``standard`` is the leaderboard's protocol,
    ``paper`` uses the paper's sizes."""

    name: str
    accuracy_n: int
    accuracy_boxes: tuple[int, ...]
    discovery_mode: str
    discovery_n: int
    minimality_n: int
    faithfulness_n: int
    mean_n: int
    random_draws: int
    completeness_draws: int
    dcm: str  # a DCM_PRESETS name
    dcm_seeds: tuple[int, ...]
    dcm_groups: tuple[str, ...]  # groups whose heads get DCM masks
    cmap_n: int
    cmap_variants: tuple[str, ...]
    batch_size: int = 16
    minimality: str | None = None  # discovery's pruning: "pairs", "single", "none"; None = discover's default
    # How a discovered circuit's size is chosen: "top-k" (the paper's k per group, the paper rows' rule) or
    # "faithfulness" (grown along the ranking to target_fraction x the form's ceiling on sizing_n
    # held-out prompts; discovery.discover(size=...))
    circuit_size: str = "top-k"
    target_fraction: float = 0.9
    sizing_n: int = 100
    # Edges between the circuits' groups (the scorecard's ``edges`` section, docs/method.md §13): the edge types
    # scored (none: no section) on the first ``edge_n`` discovery prompts. D->C is left out where cost matters:
    # its runs recompute most of the prompt (10-25 min per model on 2 cores at n 32).
    edge_types: tuple[str, ...] = ()
    edge_n: int = 32


SCORE_PRESETS: dict[str, Preset] = {
    # quick: a first look, sized for the 5-minute goal on 2 CPU cores (see docs/benchmarks.md). Its circuits
    # are the discovery's top-k and its mean-ablation set is 32 prompts, so its faithfulness rows are noisy
    # (+-0.05 between reference sets) and read against the ceilings reported beside them. It leaves out
    # what the scorecard shows least: completeness (12 of the own circuit's 28 evaluations, and no
    # scorecard field), 5 of the 10 random circuits (the random baseline is a reference, as in standard)
    # and CMAP's qkv variant (the output variant is the headline gain). Discovery uses 16 prompts, half
    # the passes of 32 (fast discovery at n 16 recovered the exact top-k of every group on
    # smollm2-135m-instruct: tests/bench/bench_circuits.py).
    "quick": Preset("quick", accuracy_n=100, accuracy_boxes=(3, 5, 7), discovery_mode="fast", discovery_n=16,
                    minimality_n=32, faithfulness_n=50, mean_n=32, random_draws=5, completeness_draws=0,
                    # DCM and its semantics check take each source context from another base example and
                    # reuse its clean run (DCM preset quick-dataset): the fresh contexts of quick-sized and
                    # standard cost a whole prompt each, 45% of DCM's time and ~90% of the check's
                    dcm="quick-dataset", dcm_seeds=(0,), cmap_n=64, cmap_variants=("output",),
                    # The structure reader's mask trains through almost the whole prompt (its position is
                    # early): ~85% of DCM time on CPU. CMAP patches the whole D group anyway (paper rule).
                    dcm_groups=("value_fetcher", "position_transmitter", "position_detector"),
                    # Measured on the tiny pair (n=32): single-node minimality pruned the fast circuits to
                    # 1 and 0 heads (each node alone moves faithfulness less than the threshold), leaving
                    # nothing to evaluate; so the quick preset keeps the verified top-k without pruning.
                    minimality="none"),
    # quick-sized: quick with circuits sized by faithfulness (grown to 0.9 x the form's ceiling on held-out
    # prompts) and stable faithfulness sizes: the paper's 500 mean-ablation prompts (with 32, faithfulness
    # moved by +-0.05 between reference sets) and 200 items (the top-k circuits kept 0.33 / 0.00 of the tiny
    # models' own accuracy: issue #12). Its run time on 2 CPU cores is not yet measured.
    "quick-sized": Preset("quick-sized", accuracy_n=100, accuracy_boxes=(3, 5, 7), discovery_mode="fast",
                          discovery_n=32, minimality_n=32, faithfulness_n=200, mean_n=500, random_draws=10,
                          completeness_draws=2, circuit_size="faithfulness", sizing_n=100,
                          dcm="quick", dcm_seeds=(0,), cmap_n=64, cmap_variants=("output", "qkv"),
                          dcm_groups=("value_fetcher", "position_transmitter", "position_detector"),
                          minimality="none"),
    # standard: the leaderboard's protocol (benchmark version 1.1), sized so that rows separate: 7-box
    # accuracy on 400 prompts (a Wilson 95% half-width <= 0.049 at any accuracy), circuits sized by
    # faithfulness as in quick-sized, faithfulness and CMAP on 200 items, 500 mean-ablation prompts, and DCM
    # over 3 seeds (one seed gives no interval over seeds). Every measured leaderboard row uses it. Random
    # circuits: 5 draws (10 in the other presets): each draw is a full faithfulness run on 200 items, and
    # the random baseline is a reference beside the circuit, not a leaderboard figure.
    "standard": Preset("standard", accuracy_n=400, accuracy_boxes=(3, 5, 7), discovery_mode="fast",
                       discovery_n=32, minimality_n=32, faithfulness_n=200, mean_n=500, random_draws=5,
                       completeness_draws=2, circuit_size="faithfulness", sizing_n=100,
                       dcm="quick", dcm_seeds=(0, 1, 2), cmap_n=200, cmap_variants=("output", "qkv"),
                       dcm_groups=("value_fetcher", "position_transmitter", "position_detector"),
                       minimality="none", edge_types=("C->B", "B->A", "A->logits"), edge_n=32),
    "paper": Preset("paper", accuracy_n=500, accuracy_boxes=(3, 5, 7), discovery_mode="exact", discovery_n=300,
                    minimality_n=100, faithfulness_n=500, mean_n=500, random_draws=10, completeness_draws=10,
                    dcm="paper", dcm_seeds=(0, 1, 2), cmap_n=500,
                    cmap_variants=("output", "q", "k", "v", "qk", "qkv"),
                    dcm_groups=("value_fetcher", "position_transmitter", "position_detector", "structure_reader"),
                    edge_types=("D->C", "C->B", "B->A", "A->logits"), edge_n=32),
}


def resolve_preset(name: str | Preset, discovery: str | None = None) -> Preset:
    """A preset by name (or as given), with its discovery mode replaced when ``discovery`` is set."""
    if isinstance(name, Preset):
        preset = name
    elif name not in SCORE_PRESETS:
        raise EtbenchError(f"unknown preset {name!r}; known: {', '.join(SCORE_PRESETS)}")
    else:
        preset = SCORE_PRESETS[name]
    if discovery is not None:
        if discovery not in DISCOVERY_MODES:
            raise EtbenchError(f"discovery must be one of {', '.join(DISCOVERY_MODES)}, got {discovery!r}")
        preset = replace(preset, discovery_mode=discovery)
    # a preset built in Python (not a SCORE_PRESETS name) would otherwise fail at its circuit stage, after the
    # models loaded and both accuracy stages ran
    check_sizing(preset.circuit_size, preset.target_fraction)
    return preset
