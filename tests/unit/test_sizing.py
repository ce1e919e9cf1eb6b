"""The two faithfulness normalisations and circuit growth to a target, on a planted stand-in runner (no model)."""

from __future__ import annotations

import math

import pytest

from etbench.core.errors import EtbenchError
from etbench.core.stats import mib_ci, mib_normalised, proportion_ci
from etbench.metrics.sizing import grow_circuit, paper_ratio
from etbench.schema.circuit import GROUPS


def test_normalisations():
    assert paper_ratio(0.3, 0.6) == pytest.approx(0.5)
    assert mib_normalised(0.3, 0.6, 0.1) == pytest.approx(0.4)
    assert mib_normalised(0.6, 0.6, 0.1) == pytest.approx(1.0)
    assert mib_normalised(0.1, 0.6, 0.1) == pytest.approx(0.0)
    assert math.isnan(mib_normalised(0.3, 0.2, 0.2))  # model no better than the empty circuit
    assert math.isnan(paper_ratio(0.3, 0.0))


class PlantedRunner:
    """Stands in for an AblationRunner: item i is correct iff every head of its required set is kept
    at its position class. A known answer for the growth search, without a model."""

    def __init__(self, required: list[set[tuple[str, int, int]]], n_layers: int = 4, n_heads: int = 4):
        self.required = required
        self.calls = 0

    def correct(self, keep=None, ablate=None):
        self.calls += 1
        if keep is None:
            return [True] * len(self.required)
        kept = {(pc, layer, head) for pc, heads in keep.items() for layer, head in heads}
        return [req <= kept for req in self.required]


class FakeCeiling:
    def __init__(self, model, none, form):
        self.model = proportion_ci(round(model * 100), 100)
        self.no_heads = proportion_ci(round(none * 100), 100)
        self.form_faithfulness = form / model
        self.none_correct = tuple(i < round(none * 100) for i in range(100))  # the empty circuit's rows


def test_growth_reaches_a_planted_target():
    # 10 items; 9 need A:(3,1) at the last token and C:(1,2) at the query label; one needs a head
    # the ranking puts last (an unreachable item: the target of 0.9 still holds)
    need = {("last", 3, 1), ("query_label", 1, 2)}
    required = [need] * 9 + [{("last", 0, 0), ("query_label", 0, 0), ("prev_query_label", 0, 0)}]
    runner = PlantedRunner(required)
    rankings = {g: [(3, 1), (2, 2), (1, 1), (0, 3)] for g in GROUPS}
    rankings["position_detector"] = [(0, 1), (1, 2), (2, 0), (3, 3)]
    growth = grow_circuit(runner, rankings, ceiling=FakeCeiling(1.0, 0.0, 1.0), target_fraction=0.9)
    assert growth.reached and growth.strategy == "scaled-shape"
    # the smallest scale that keeps A's first head and C's first two: 2 heads per group
    assert growth.chosen == {g: 2 for g in GROUPS}
    chosen_step = next(s for s in growth.steps if s.sizes == growth.chosen)
    assert chosen_step.faithfulness == pytest.approx(0.9)
    assert growth.steps[0].size == 0 and growth.steps[0].faithfulness == 0
    assert all(s.faithfulness < 0.9 for s in growth.steps if s.size < chosen_step.size)
    sizes = [s.size for s in growth.steps]
    assert sizes == sorted(sizes)


def test_growth_keeps_the_paper_shape_and_bisects():
    # A needs its 6th head; the shape is A 8 : B 2 : C 4 : D 2, so scale 1 is the paper's top-k
    runner = PlantedRunner([{("last", 5, 0)}] * 5)
    rankings = {g: [(layer, 0) for layer in range(16)] for g in GROUPS}
    shape = {"value_fetcher": 8, "position_transmitter": 2, "position_detector": 4, "structure_reader": 2}
    growth = grow_circuit(runner, rankings, ceiling=FakeCeiling(1.0, 0.0, 1.0), shape=shape)
    assert growth.reached
    assert growth.chosen["value_fetcher"] == 6  # the smallest A size at the target, found by bisection
    assert growth.chosen["position_transmitter"] == 2  # scale 0.75 of 2, rounded up
    assert {s.added for s in growth.steps} == {"empty", "double", "bisect"}
    assert runner.calls <= 6  # O(log N) evaluations, not one per node


def test_growth_reports_an_unreachable_target():
    runner = PlantedRunner([{("last", 9, 9)}] * 4)  # a head no ranking holds
    rankings = {g: [(0, 0), (1, 1)] for g in GROUPS}
    growth = grow_circuit(runner, rankings, ceiling=FakeCeiling(1.0, 0.0, 1.0), target_fraction=0.9)
    assert not growth.reached
    assert "not reached" in growth.note
    assert all(v == 2 for v in growth.chosen.values())  # it tried everything the rankings hold
    assert growth.steps[-1].sizes == {g: 2 for g in GROUPS}


def test_growth_rejects_a_bad_fraction():
    with pytest.raises(EtbenchError):
        grow_circuit(PlantedRunner([set()]), {}, ceiling=FakeCeiling(1.0, 0.0, 1.0), target_fraction=1.5)




def test_growth_with_an_undefined_ceiling_grows_nothing():
    runner = PlantedRunner([set()] * 3)
    growth = grow_circuit(runner, {g: [(0, 0)] for g in GROUPS}, ceiling=FakeCeiling(0.0001, 0.0, 0.0))
    assert not growth.reached and growth.steps == [] and runner.calls == 0
    assert "nothing to grow" in growth.note


def test_mib_ci_brackets_the_point_and_is_degenerate_only_when_items_agree():

    model = [True] * 60 + [False] * 40
    none = [False] * 95 + [True] * 5
    circuit = [True] * 30 + [False] * 70
    lo, hi = mib_ci(circuit, model, none, seed=1)
    point = mib_normalised(0.30, 0.60, 0.05)
    assert lo < point < hi and hi - lo > 0.05
    assert mib_ci(model, model, none) == (1.0, 1.0)  # the model itself: exactly 1 in every resample
    assert all(math.isnan(x) for x in mib_ci([True], [False], [True]))


def test_magnitude_order_puts_exact_heads_first_by_size_of_effect_either_sign():
    from etbench.metrics.discovery import GroupSearch, magnitude_order

    scores = [[-0.5, 0.9, 0.0], [0.1, -0.05, 3.0]]  # (1, 2) is screened only: its attribution scale differs
    exact = [[True, True, True], [True, True, False]]
    search = GroupSearch("value_fetcher", [], scores, exact, None, [], {}, 0.0)
    assert magnitude_order(search) == [(0, 1), (0, 0), (1, 0), (1, 1), (0, 2), (1, 2)]


def test_a_preset_with_a_bad_size_rule_is_refused_before_anything_runs():
    from dataclasses import replace

    from etbench.scoring.presets import SCORE_PRESETS, resolve_preset

    quick = SCORE_PRESETS["quick"]
    with pytest.raises(EtbenchError, match="size rule"):
        resolve_preset(replace(quick, circuit_size="faithfulnes"))
    with pytest.raises(EtbenchError, match="target fraction"):
        resolve_preset(replace(quick, circuit_size="faithfulness", target_fraction=0.0))
    for name in SCORE_PRESETS:
        assert resolve_preset(name) == SCORE_PRESETS[name]


def test_a_non_finite_score_ranks_last_and_leaves_the_order_of_the_others_intact():
    # one NaN effect (p_clean underflowed to 0) compared false with every score: the ranking came back in input
    # order, 0.1 first and 0.9 third
    from etbench.metrics.discovery import GroupSearch, magnitude_order, most_negative_first

    nan = float("nan")
    search = GroupSearch("value_fetcher", [], [[0.1, nan, 0.9, -0.5, 0.3]], [[True] * 5], None, [], {}, 0.0)
    assert magnitude_order(search) == [(0, 2), (0, 3), (0, 4), (0, 0), (0, 1)]
    scores = [0.1, nan, -0.9, float("-inf"), -0.5]
    assert sorted(range(5), key=lambda i: most_negative_first(scores[i])) == [2, 4, 0, 1, 3]


def test_a_given_mean_is_used_only_for_the_prompts_it_was_taken_over():
    """Sizing and faithfulness share one mean (scoring.graph.PairRun.mean); a mean over other prompts (another
    count, box count or seed) is refused by name, never silently ablated with."""
    import torch

    from etbench.metrics.ablation import MeanActivations

    mean = MeanActivations([torch.zeros(3, 2, 4)], torch.ones(3), n_prompts=500, n_boxes=7, seed=0)
    assert mean.require(500, 7, 0, "sizing") is mean
    for n, boxes, seed in ((100, 7, 0), (500, 3, 0), (500, 7, 1)):
        with pytest.raises(EtbenchError, match="sizing: the given mean activations are over 500 prompts of 7 boxes"):
            mean.require(n, boxes, seed, "sizing")
