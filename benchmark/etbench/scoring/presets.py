"""Scoring presets: the size of every stage of a scorecard run. The preset (and the DCM configuration it
names) is recorded in every scorecard's config, so a scorecard says exactly how it was made."""

from __future__ import annotations

from dataclasses import dataclass, replace

from etbench.core.errors import EtbenchError
from etbench.schema.circuit import DISCOVERY_MODES

DEFAULT_BASE, DEFAULT_FT = "tiny-base", "tiny-ft"


@dataclass(frozen=True)
class Preset:
    """Sizes of every stage. ``quick`` is sized for a 2-core CPU; ``paper`` uses the paper's sizes."""

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


SCORE_PRESETS: dict[str, Preset] = {
    "quick": Preset("quick", accuracy_n=100, accuracy_boxes=(3, 5, 7), discovery_mode="fast", discovery_n=32,
                    minimality_n=32, faithfulness_n=50, mean_n=32, random_draws=10, completeness_draws=2,
                    dcm="quick", dcm_seeds=(0,), cmap_n=64, cmap_variants=("output", "qkv"),
                    # The structure reader's mask trains through almost the whole prompt (its position is
                    # early): ~85% of DCM time on CPU. CMAP patches the whole D group anyway (paper rule).
                    dcm_groups=("value_fetcher", "position_transmitter", "position_detector"),
                    # Measured on the tiny pair (n=32): single-node minimality pruned the fast circuits to
                    # 1 and 0 heads (each node alone moves faithfulness less than the threshold), leaving
                    # nothing to evaluate; so the quick preset keeps the verified top-k without pruning.
                    minimality="none"),
    "paper": Preset("paper", accuracy_n=500, accuracy_boxes=(3, 5, 7), discovery_mode="exact", discovery_n=300,
                    minimality_n=100, faithfulness_n=500, mean_n=500, random_draws=10, completeness_draws=10,
                    dcm="paper", dcm_seeds=(0, 1, 2), cmap_n=500,
                    cmap_variants=("output", "q", "k", "v", "qk", "qkv"),
                    dcm_groups=("value_fetcher", "position_transmitter", "position_detector", "structure_reader")),
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
    return preset
