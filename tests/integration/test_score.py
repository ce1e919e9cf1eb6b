"""etbench score end to end on a toy pair: deterministic bytes, resume after an interruption,
clear failures. (The embedded tiny pair's numbers are in tests/integration/test_trained_families.py.)"""

import subprocess
import sys

import pytest

from etbench import api
from etbench.core.errors import EtbenchError
from etbench.publish.terminal import format_timings
from etbench.scoring import graph
from etbench.scoring import pipeline as scoring
from support.toy_pair import write_toy_pair

# Tiny sizes: the point here is plumbing, determinism and resumption, not the numbers.
MICRO = scoring.Preset("micro", accuracy_n=14, accuracy_boxes=(3, 7), discovery_mode="fast", discovery_n=8,
                       minimality_n=8, faithfulness_n=14, mean_n=8, random_draws=2, completeness_draws=1, dcm="quick",
                       dcm_seeds=(0,), cmap_n=14, cmap_variants=("output", "qkv"),
                       dcm_groups=("value_fetcher", "position_transmitter", "position_detector", "structure_reader"))


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    return write_toy_pair(tmp_path_factory.mktemp("toy_pair"))


def run_score(root, out, **kwargs):
    return api.score(str(root / "base"), str(root / "ft"), out, preset=MICRO, progress=False,
                     circuit_base=str(root / "circuit.json"), circuit_ft=str(root / "circuit.json"), **kwargs)


@pytest.mark.slow
def test_same_seed_gives_byte_identical_scorecards_and_resume_after_interruption(toy_pair, tmp_path, monkeypatch):
    first = run_score(toy_pair, tmp_path / "a")
    card = first.path.read_bytes()
    assert {f.model for f in first.card.faithfulness} == {"base", "ft"} and first.card.dcm and first.card.cmap
    assert "full" in {c.group for c in first.card.cmap}
    # the semantics check patches the base's DCM heads into both models, every (group, desideratum) once each
    sem = first.card.semantics
    assert {s.model for s in sem} == {"base", "ft"} and all(s.accuracy.n == 32 for s in sem)
    assert {(s.group, s.desideratum) for s in sem if s.model == "ft"} == {(d.group, d.desideratum) for d in
                                                                          first.card.dcm if d.circuit == "base"}
    timings = __import__("json").loads((tmp_path / "a" / "timings.json").read_text())
    assert set(timings["peak_rss_mb"]) == set(timings["computed_s"]) and min(timings["peak_rss_mb"].values()) > 0
    for name in ("items.jsonl", "report.md", "report.html", "timings.json", "circuit_base.json"):
        assert (tmp_path / "a" / name).exists()

    # A second, independent run writes the same bytes.
    assert run_score(toy_pair, tmp_path / "b").path.read_bytes() == card

    # Interrupt a third run in its last stage (CMAP), then resume: earlier stages come from disk.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graph, "run_cmap_sets", interrupted)  # the graph's CMAP stage
    with pytest.raises(KeyboardInterrupt):
        run_score(toy_pair, tmp_path / "c")
    assert not (tmp_path / "c" / "scorecard.json").exists()
    assert (tmp_path / "c" / "stages" / "dcm_ft_seed0.json").exists()
    monkeypatch.undo()
    resumed = run_score(toy_pair, tmp_path / "c")
    assert resumed.path.read_bytes() == card
    # the items file too (submit records its hash): stages read back from disk gave the same rows in another order
    assert (tmp_path / "c" / "items.jsonl").read_bytes() == (tmp_path / "a" / "items.jsonl").read_bytes()
    assert "accuracy_base" in resumed.cached_stages and "cmap" not in resumed.cached_stages

    # A different seed is a different configuration: nothing is reused from the cache.
    other = run_score(toy_pair, tmp_path / "c", seed=1)
    assert other.card.config_hash != first.card.config_hash and other.cached_stages == []


def test_a_second_fine_tune_of_a_base_reuses_the_base_models_stages_and_faithfulness_parts(toy_pair, tmp_path):
    """Scoring another fine-tune of one base with ``reuse_stages`` (an earlier run of that base) copies the
    base side's stages and recomputes on the base model only the new circuit's faithfulness: the base's
    ceilings and its own circuit's evaluation come from the earlier run. The scorecard is byte-identical
    to one computed from scratch, and the earlier run's directory is left as it was."""
    import json

    from etbench.schema.circuit import Circuit, Node

    other = Circuit({"value_fetcher": [Node("value_fetcher", 1, 1)],
                     "position_transmitter": [Node("position_transmitter", 0, 2)],
                     "position_detector": [Node("position_detector", 0, 0)], "structure_reader": []},
                    model="toy", n_layers=2, n_heads=4)
    other_path = tmp_path / "other_circuit.json"
    other.save(other_path)
    run_score(toy_pair, tmp_path / "first")
    before = {f.name: f.read_bytes() for f in (tmp_path / "first" / "stages").iterdir()}

    def second(out, **kwargs):
        return api.score(str(toy_pair / "base"), str(toy_pair / "ft"), out, preset=MICRO, progress=False,
                         circuit_base=str(toy_pair / "circuit.json"), circuit_ft=str(other_path), **kwargs)

    reused = second(tmp_path / "second", reuse_stages=[tmp_path / "first"])
    copied = json.loads((tmp_path / "second" / "timings.json").read_text())["reused_from_other_runs"]
    assert {"accuracy_base", "circuit_base", "dcm_base_seed0", "semantics_base", "faithfulness_base_ceilings",
            "faithfulness_base_of_base"} <= set(copied)
    # the same ft model (its accuracy and ceilings are reused too) with another circuit: what reads it is not
    assert {"circuit_ft", "dcm_ft_seed0", "faithfulness_base_of_ft", "faithfulness_ft_of_ft", "cmap"}.isdisjoint(copied)
    assert {"faithfulness_base", "faithfulness_base_of_ft", "faithfulness_ft_of_ft", "cmap"} <= set(reused.timings)
    assert set(copied).isdisjoint(reused.timings)
    assert reused.reused_stages == copied  # and the terminal says so, apart from this run's own cache
    assert set(copied).isdisjoint(reused.cached_stages)  # listed once: timings.json named them under both
    assert f"copied from other runs: {', '.join(copied)}" in format_timings(reused)
    # stored with what made them (the stage keys hold the inputs only): another device's are not taken
    made_with = json.loads((tmp_path / "first" / "stages" / "faithfulness_base_ceilings.json").read_text())["made_with"]
    assert made_with["device"] == "cpu" and "torch" in made_with["libraries"]
    assert reused.path.read_bytes() == second(tmp_path / "scratch").path.read_bytes()
    assert {f.name: f.read_bytes() for f in (tmp_path / "first" / "stages").iterdir()} == before


def test_unknown_preset_and_bad_circuit_are_clear_errors(tmp_path):
    with pytest.raises(EtbenchError, match="unknown preset"):
        scoring.score("a", "b", tmp_path, preset="huge")
    with pytest.raises(EtbenchError, match="circuit file not found"):
        scoring.score("a", "b", tmp_path, circuit_base=str(tmp_path / "missing.json"))
    with pytest.raises(EtbenchError, match="unknown paper circuit"):
        scoring.score("a", "b", tmp_path, circuit_ft="paper:gpt5")


def test_score_of_the_paper_models_offline_fails_fast_with_one_line(tmp_path):
    # fails before any model work; the subprocess timeout is a hang guard, not a timing target (tests/bench)
    result = subprocess.run([sys.executable, "-m", "etbench.cli", "score", "--base", "llama7b", "--ft", "goat",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("etbench: error:") and "huggyllama/llama-7b" in lines[-1]
    assert not (tmp_path / "o" / "scorecard.json").exists()


def test_scorecard_reports_ceilings_mib_and_labelled_cmap_head_sets(toy_pair, tmp_path):
    card = run_score(toy_pair, tmp_path / "a").card
    assert {c.model for c in card.ceilings} == {"base", "ft"}
    for c in card.ceilings:
        # every head kept at every position through the ablation edits is the model itself
        assert c.every_head_every_position.value == c.model_accuracy.value
        assert c.form_accuracy.n == c.model_accuracy.n == MICRO.faithfulness_n
    assert all(f.faithfulness_mib is not None for f in card.faithfulness)
    assert {c.heads for c in card.cmap} == {"dcm", "circuit"}
    assert {c.variant for c in card.cmap if c.heads == "circuit"} == {"output"}
    assert all(s.size_rule == "given" for s in card.circuits)
    # one circuit per model: the overlap carries no interval rather than one of width zero
    assert all(o.base_in_ft.low is None for o in card.overlap if o.heads == "circuit")


def test_circuits_sized_by_faithfulness_record_their_growth(toy_pair, tmp_path):
    from dataclasses import replace

    sized = replace(MICRO, circuit_size="faithfulness", sizing_n=8)
    run = scoring.score(str(toy_pair / "base"), str(toy_pair / "ft"), tmp_path / "s", preset=sized, progress=False)
    for summary in run.card.circuits:
        assert summary.size_rule == "faithfulness" and summary.sizing is not None
        assert summary.sizing["target_fraction"] == 0.9 and summary.sizing["n"] == 8
        # random toys score 0: the growth says why it grew nothing instead of inventing a circuit
        if not summary.sizing["reached"]:
            assert summary.sizing["note"]


def test_the_mean_that_sizing_and_faithfulness_ablate_with_is_computed_once_per_side(toy_pair, tmp_path, monkeypatch):
    """Circuits sized by faithfulness and the faithfulness stage ablate with the same mean (same prompts, seed
    and model): it is computed once per side, and the scorecard is byte-identical to one whose stages each
    computed their own (as before the sharing)."""
    from dataclasses import replace

    sized = replace(MICRO, circuit_size="faithfulness", sizing_n=8)
    calls = []
    real = graph.mean_activations
    monkeypatch.setattr(graph, "mean_activations", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    shared = scoring.score(str(toy_pair / "base"), str(toy_pair / "ft"), tmp_path / "shared", preset=sized,
                           progress=False)
    assert len(calls) == 2  # one per side, under the run's seed

    once = graph.PairRun.mean

    def every_time(self, side):  # the stages' own means, as each computed before
        self.means.pop(side, None)
        return once(self, side)

    monkeypatch.setattr(graph.PairRun, "mean", every_time)
    apart = scoring.score(str(toy_pair / "base"), str(toy_pair / "ft"), tmp_path / "apart", preset=sized,
                          progress=False)
    assert len(calls) == 2 + 4  # sizing and faithfulness, each side
    assert apart.path.read_bytes() == shared.path.read_bytes()


def test_every_number_of_a_fresh_scorecard_re_derives_from_its_rows(toy_pair, tmp_path):
    """Scorecard schema 3: a scored card carries the rows of its random-circuit baselines (per draw), sizing
    records (per sizing prompt) and semantics checks (per repeat); submit's re-derivation reproduces every
    number with nothing left out, and refuses a baseline changed by one draw's worth."""
    from dataclasses import replace

    from etbench.publish.rederive import rederive

    sized = replace(MICRO, circuit_size="faithfulness", sizing_n=8)
    run = scoring.score(str(toy_pair / "base"), str(toy_pair / "ft"), tmp_path / "s", preset=sized, progress=False)
    measures = {r["measure"] for r in run.items}
    assert {"random_circuit", "sizing"} <= measures
    assert ("semantics" in measures) == bool(run.card.semantics)
    assert run.card.absent == [] and rederive(run.card, run.items) == []
    f = run.card.faithfulness[0]
    moved = (f.random_circuit_accuracy.value or 0) + 1 / (sized.random_draws * sized.faithfulness_n)
    forged = replace(run.card, faithfulness=[replace(f, random_circuit_accuracy=replace(
        f.random_circuit_accuracy, value=moved))] + run.card.faithfulness[1:])
    with pytest.raises(EtbenchError, match="random circuit accuracy of the base circuit on base"):
        rederive(forged, run.items)
