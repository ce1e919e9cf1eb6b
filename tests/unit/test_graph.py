"""The scoring pipeline's declared stage graph: run order, sides, the keys stages are stored under (they must
stay those of the pipeline before it was a graph, or every stored stage recomputes and a re-assembled
scorecard drifts) and ``etbench score --plan``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from etbench.core.io import config_hash
from etbench.metrics.dcm import dcm_preset
from etbench.schema.circuit import Circuit
from etbench.scoring import graph
from etbench.scoring.presets import SCORE_PRESETS
from etbench.scoring.stages import Deferred

STANDARD = SCORE_PRESETS["standard"]


def placeholder_run(preset=STANDARD, given=None):
    """A run whose upstream results are placeholders (nothing loads): enough to compute every key."""
    ref = {w: {"ref": f"{w}-model", "revision": f"rev-{w}"} for w in graph.SIDES}
    common = {"benchmark_version": "1.1", "seed": 0, "dtype": "float32", "batch_size": 16}
    run = graph.PairRun(preset, 0, common, ref, {}, load=lambda w: pytest.fail("a key loaded a model"),
                        given=given or {"base": None, "ft": None}, recorded=given or {"base": None, "ft": None},
                        cache=None)
    for name in graph.stage_names(preset):
        run.results[name] = Deferred(lambda name=name: {"circuit": {"of": name}, "selections": [], "of": name})
    return run


def edges_run():
    """A placeholder run whose circuits are real (the edges' key reads their node set)."""
    run = placeholder_run()
    heads = {"base": {"A": [[5, 0]], "B": [[3, 0]], "C": [[2, 0]], "D": [[1, 0]]},
             "ft": {"A": [[4, 1], [5, 0]], "B": [[3, 0]], "C": [[2, 0]], "D": [[1, 0]]}}
    for w in graph.SIDES:
        circuit = Circuit.from_heads(heads[w], n_layers=6, n_heads=4).to_dict()
        run.results[f"circuit_{w}"] = Deferred(lambda c=circuit: {"circuit": c})
    return run


def key_of(run, name):
    inst = next(i for i in graph.instances(run.preset) if i.name(run.preset) == name)
    return graph.depends(run, inst)


def test_instances_are_the_pipelines_stages_in_its_order():
    assert graph.stage_names(STANDARD) == [
        "models", "accuracy_base", "accuracy_ft", "circuit_base", "circuit_ft",
        *[f"dcm_{w}_seed{s}" for w in ("base", "ft") for s in (0, 1, 2)],
        "faithfulness_base", "faithfulness_ft", "semantics_base", "semantics_ft", "edges_base", "edges_ft", "cmap"]
    assert graph.stage_names(SCORE_PRESETS["quick"])[5:7] == ["dcm_base_seed0", "dcm_ft_seed0"]
    # a preset that scores no edges runs no edges stage; CMAP stays last (score-many's base side hands off there)
    assert not any(n.startswith("edges") for n in graph.stage_names(SCORE_PRESETS["quick"]))
    assert graph.stage_names(SCORE_PRESETS["quick"])[-1] == graph.GRAPH[-1].name == "cmap"


def test_declared_keys_are_the_keys_the_pipeline_stored_stages_under():
    """Written out by hand from the pipeline before the graph (its closures' ``depends``)."""
    run, p = placeholder_run(), STANDARD
    common, ref = run.common, run.ref
    circuit = {w: config_hash({"of": f"circuit_{w}"}) for w in graph.SIDES}
    dcm0 = {w: config_hash({"circuit": {"of": f"dcm_{w}_seed0"}, "selections": [], "of": f"dcm_{w}_seed0"})
            for w in graph.SIDES}
    assert key_of(run, "models") == {**common, **ref}
    assert key_of(run, "accuracy_ft") == {**common, "model": ref["ft"], "n": 400, "boxes": (3, 5, 7)}
    assert key_of(run, "circuit_base") == {**common, "model": ref["base"], "given": None, "discovery": {
        "mode": "fast", "n": 32, "minimality_n": 32, "mean_n": 500, "minimality": "none", "size": "faithfulness",
        "target_fraction": 0.9, "sizing_n": 100, "growth": "scaled-shape, magnitude order", "sizing_items": True}}
    assert key_of(run, "dcm_ft_seed2") == {**common, "model": ref["ft"], "circuit": circuit["ft"],
                                           "dcm": dcm_preset("quick", seed=2).to_dict(), "groups": p.dcm_groups}
    assert key_of(run, "faithfulness_base") == {
        **common, "model": ref["base"], "n": 200, "mean_n": 500, "random_draws": 5, "ceiling_items": True, "random_items": True,
        "completeness_draws": 2, "circuits": circuit}
    assert key_of(run, "semantics_ft") == {**common, "model": ref["ft"], "dcm_base": dcm0["base"],
                                           "n": dcm_preset("quick").semantics_n,
                                           "repeats": dcm_preset("quick").semantics_repeats, "repeat_items": True}
    assert key_of(run, "cmap") == {**common, **ref, "n": 200, "variants": ("output", "qkv"),
                                   "head_sets": ["dcm", "circuit"], "objects": "usable",
                                   "circuit_ft": circuit["ft"], "dcm_ft": dcm0["ft"]}
    # a stage new with scorecard schema 4: keyed by the node set (not the circuits' hashes), so that a section added
    # to a stored card (scoring.extend) is keyed as a scoring run's
    assert key_of(edges_run(), "edges_ft") == {**common, "model": ref["ft"], "n": 32,
                                                "types": ("C->B", "B->A", "A->logits"), "boxes": 7, "edge_batch": 8,
                                                "nodes": {"value_fetcher": [[5, 0], [4, 1]],
                                                          "position_transmitter": [[3, 0]],
                                                          "position_detector": [[2, 0]], "structure_reader": [[1, 0]]}}
    given = placeholder_run(given={"base": "paper:llama7b", "ft": None})
    assert key_of(given, "circuit_base")["given"] == "paper:llama7b"
    assert key_of(given, "circuit_base")["discovery"] is None


def test_every_stage_and_part_has_one_worker_and_unknown_names_are_refused():
    assert {graph.worker_of(n) for n in ("models", "cmap", "dcm_ft_seed1", "faithfulness_ft_of_base")} == {"ft"}
    assert {graph.worker_of(n) for n in ("semantics_base", "dcm_base_seed2", "faithfulness_base_ceilings")} == {"base"}
    with pytest.raises(ValueError, match="not a stage"):
        graph.worker_of("dcm_base_seedx")


def test_score_plan_prints_every_stage_with_its_side_reads_and_inputs_without_loading_a_model(tmp_path):
    plan = graph.format_plan(STANDARD)
    lines = plan.splitlines()
    assert lines[0] == "preset standard: 18 stages, in run order"
    for name in graph.stage_names(STANDARD):
        assert sum(line.split()[0] == name for line in lines[2:] if line) == 1
    assert "  dcm_{side}_seed{seed}: DCM masks on the side's own circuit, one DCM seed" in lines
    cmap = next(line for line in lines if line.startswith("cmap "))
    assert "pair (ft)" in cmap and "circuit_ft, dcm_ft_seed0" in cmap and "n=cmap_n:200" in cmap
    assert next(line for line in lines if line.startswith("semantics_ft ")).split()[1] == "ft"
    cli = subprocess.run([sys.executable, "-m", "etbench.cli", "score", "--plan", "--preset", "quick",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == graph.format_plan(SCORE_PRESETS["quick"])
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_circuits_cost_record_is_not_in_any_downstream_key():
    """A circuit stage recomputed to the same heads (a re-run, a resumed run) records other wall seconds in its
    ``stats``; DCM, faithfulness and CMAP must keep their keys (they were all recomputed before), while a
    change of heads must change them."""
    def keys(run):
        return {n: key_of(run, n) for n in ("dcm_ft_seed0", "faithfulness_base", "cmap")}

    runs = [edges_run() for _ in range(3)]
    for run, wall in zip(runs, (1.0, 2.5)):
        c = run.value("circuit_ft")["circuit"]
        run.results["circuit_ft"] = Deferred(lambda c=c, wall=wall: {
            "circuit": {**c, "stats": {"wall_s": {"search": wall}}}})
    other = Circuit.from_heads({"A": [[4, 1]], "B": [[3, 0]], "C": [[2, 0]], "D": [[1, 0]]}, n_layers=6,
                               n_heads=4).to_dict()
    runs[2].results["circuit_ft"] = Deferred(lambda: {"circuit": other})
    assert keys(runs[0]) == keys(runs[1]) == keys(edges_run())
    changed = keys(runs[2])
    assert all(changed[n] != keys(runs[0])[n] for n in ("dcm_ft_seed0", "faithfulness_base", "cmap"))
    assert runs[0].circuit_key("ft") == runs[1].circuit_key("ft") != runs[2].circuit_key("ft")
