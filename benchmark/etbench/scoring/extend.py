"""A section added to a scorecard after it was scored, from the card's own models, circuits and seed.

Re-scoring a ``standard`` row costs 1-2 hours of 2 CPU cores; the ``edges`` section (scorecard schema 4) needs
only the two models, the two circuits the card carries and its seed. ``add_edges`` computes it as the scoring
graph's ``edges_{side}`` stages would (same stage function, same keys: a stage stored by ``etbench score`` is
read back), appends it and its ``edge_effect`` rows, and records in ``provenance.added`` that the section
was added later and by which etbench. Nothing else on the card changes: its config (and hash) stays the one it
was scored under, so its other numbers re-derive as before. ``etbench submit --add-edges`` writes the result
through submit's own checks and store transaction.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from etbench import __version__, models
from etbench.core.errors import EtbenchError
from etbench.core.io import check_output_dir
from etbench.schema import scorecard as sc
from etbench.schema.circuit import Circuit
from etbench.scoring import graph
from etbench.scoring.assemble import edges_section, library_versions
from etbench.scoring.pipeline import PairLoader
from etbench.scoring.presets import SCORE_PRESETS, Preset
from etbench.scoring.stages import Deferred, StageCache

EDGES = "edges"
#: Sections ``add_section`` can add.
ADDABLE = (EDGES,)


def preset_of(card: sc.Scorecard) -> Preset:
    """The current definition of the preset the card was scored under (``submit`` checks that the card's
    recorded preset is that definition)."""
    recorded = card.config.get("preset")
    name = recorded.get("name") if isinstance(recorded, dict) else recorded
    if name not in SCORE_PRESETS:
        raise EtbenchError(f"the card's preset {name!r} is not a preset of this etbench")
    return SCORE_PRESETS[name]


def check_addable(card: sc.Scorecard, section: str = EDGES) -> Preset:
    """Refuse, before any model loads, a card that cannot take ``section``: one that has it, a preset that does
    not score it, a card of a remote run or a truncated run. Returns the preset."""
    if section not in ADDABLE:
        raise EtbenchError(f"cannot add section {section!r}; addable: {', '.join(ADDABLE)}")
    if card.edges is not None:
        raise EtbenchError("the scorecard already carries edges")
    if card.limit is not None or card.config.get("execution"):
        raise EtbenchError("edges are added only to a full local run's scorecard (not --limit, not --remote)")
    preset = preset_of(card)
    if not preset.edge_types:
        raise EtbenchError(f"preset {preset.name!r} scores no edges (edge_types is empty)")
    names = {c.name for c in card.circuits}
    if not {"base", "ft"} <= names:
        raise EtbenchError("the scorecard carries no base and ft circuits to take the edges' node set from")
    return preset


def card_identity(card: sc.Scorecard, device: str) -> dict[str, dict[str, Any]]:
    """Each model as this machine resolves the card's refs, refused unless it is the weights the card scored
    (same published source and weights revision)."""
    identity = {}
    for side in graph.SIDES:
        scored: sc.ModelCard = getattr(card, side)
        spec = models.resolve(scored.ref)
        models.materialise_sources(spec)
        here = {"ref": models.published_ref(scored.ref), "source": models.published_source(spec),
                "revision": models.spec_revision(spec)}
        if (here["source"], here["revision"]) != (scored.source, scored.revision):
            raise EtbenchError(f"the card's {side} model {scored.ref!r} resolves here to {here['source']} (revision "
                               f"{here['revision']}), not the scored {scored.source} (revision {scored.revision})")
        identity[side] = here
    models.check_device(device)
    return identity


def add_edges(card_path: str | Path, work_dir: str | Path, *, device: str = "cpu",
              progress: bool = True) -> tuple[sc.Scorecard, list[dict[str, Any]]]:
    """The card at ``card_path`` with its ``edges`` section and rows added (returned, not written).

    ``work_dir``: where the two edges stages are stored (resumable: a run stopped half-way recomputes only the
    side not stored). Every input is checked before a model loads."""
    card_path = Path(card_path) / "scorecard.json" if Path(card_path).is_dir() else Path(card_path)
    card = sc.load(card_path)
    items = sc.load_items(card_path, card)
    preset = check_addable(card)
    check_output_dir(work_dir, "--work")
    identity = card_identity(card, device)
    dtype, seed = card.provenance.dtype, int(card.config.get("seed", 0))
    shape = {"n_layers": card.base.n_layers, "n_heads": card.base.n_heads}
    circuits = {c.name: Circuit.from_heads(c.heads, **shape).to_dict() for c in card.circuits}
    common = {"benchmark_version": card.provenance.benchmark_version, "seed": seed, "dtype": dtype,
              "batch_size": preset.batch_size}
    loader = PairLoader(card.base.ref, card.ft.ref, identity, dtype=dtype, device=device, share_base_weights=False,
                        remote=False, ndif_key=None, progress=progress)
    cache = StageCache(Path(work_dir) / "stages", made_with={"etbench": __version__, "libraries": library_versions(),
                                                           "device": device, "shared_base_weights": False})
    run = graph.PairRun(preset, seed, common, {w: {"ref": identity[w]["ref"], "revision": identity[w]["revision"]}
                                               for w in graph.SIDES}, identity, loader.load,
                        {w: None for w in graph.SIDES}, {w: None for w in graph.SIDES}, cache, progress=progress)
    for w in graph.SIDES:
        run.results[f"circuit_{w}"] = Deferred(lambda w=w: {"circuit": circuits[w]})
    results = {}
    for inst in graph.instances(preset):
        if inst.stage.compute is graph.edges_stage:
            results[inst.side] = cache.run(inst.name(preset), graph.depends(run, inst),
                                           lambda inst=inst: inst.stage.compute(run, inst))
    section, rows = edges_section(results, seed)
    added = sc.AddedSection(EDGES, __version__, library_versions(), device, dtype)
    provenance = replace(card.provenance, added=[*card.provenance.added, added])
    new = sc.from_dict(sc.to_dict(replace(card, edges=section, provenance=provenance,
                                          schema_version=sc.SCHEMA_VERSION)))
    return new, items + rows
