"""etbench.overlap on hand-made head sets with known fractions and Jaccard indices."""

from __future__ import annotations

import numpy as np
import pytest

from etbench.core.errors import EtbenchError
from etbench.metrics import overlap
from etbench.schema.circuit import Circuit


def test_head_overlap_known_values():
    o = overlap.head_overlap([(1, 1), (2, 2), (3, 3), (4, 4)], [(1, 1), (2, 2), (9, 9)])
    assert (o.n_base, o.n_ft, o.n_common, o.n_union) == (4, 3, 2, 5)
    assert o.base_in_ft == 0.5 and o.jaccard == 0.4
    same = overlap.head_overlap([(1, 1)], [[1, 1]])  # lists and tuples are the same head
    assert same.base_in_ft == 1.0 and same.jaccard == 1.0
    assert overlap.head_overlap([(1, 1), (1, 1)], [(1, 1)]).n_base == 1  # duplicates ignored


def test_empty_sets_are_undefined_not_zero():
    assert overlap.head_overlap([], [(1, 1)]).base_in_ft is None
    assert overlap.head_overlap([], [(1, 1)]).jaccard == 0.0
    both = overlap.head_overlap([], [])
    assert both.base_in_ft is None and both.jaccard is None


def test_circuit_overlap_per_group_and_all_distinct():
    base = Circuit.from_heads({"A": [[1, 0], [2, 0], [3, 0], [4, 0]], "B": [[5, 0]], "C": [[6, 0], [2, 0]]})
    ft = Circuit.from_heads({"A": [[1, 0], [2, 0], [3, 0], [7, 0]], "B": [[5, 0], [8, 0]], "D": [[9, 0]]})
    scores = {s.group: s for s in overlap.circuit_overlap(base, ft)}
    assert scores["value_fetcher"].base_in_ft.value == 0.75 and scores["value_fetcher"].jaccard.value == 0.6
    assert scores["position_transmitter"].base_in_ft.value == 1.0 and scores["position_transmitter"].jaccard.value == 0.5
    assert scores["position_detector"].base_in_ft.value == 0.0  # per group: (2, 0) is in ft, but under A
    assert scores["structure_reader"].base_in_ft.value is None  # base D empty
    assert "undefined" in scores["structure_reader"].base_in_ft.note
    # all: distinct heads, base {1,2,3,4,5,6} x ft {1,2,3,5,7,8,9}: common 4, union 9
    assert scores["all"].base_in_ft.value == pytest.approx(4 / 6) and scores["all"].jaccard.value == pytest.approx(4 / 9)
    assert scores["all"].base_in_ft.method == "exact" and scores["all"].base_in_ft.low is None
    assert scores["all"].base_in_ft.high is None and "no CI" in scores["all"].base_in_ft.note
    assert all(s.heads == "circuit" for s in scores.values())
    # a mapping with group letters gives the same answer as the Circuit
    as_map = overlap.circuit_overlap({"A": base.heads("A"), "B": base.heads("B"), "C": base.heads("C")},
                                     {g: ft.heads(g) for g in "ABD"})
    assert [s.base_in_ft.value for s in as_map] == [s.base_in_ft.value for s in overlap.circuit_overlap(base, ft)]


def test_dcm_overlap_over_seeds():
    base_runs = [{"A": [(1, 1), (2, 2)]}, {"A": [(1, 1)]}, {"A": [(3, 3)]}, {"A": [(1, 1), (3, 3)]}]
    ft_runs = [{"A": [(1, 1)]}, {"A": [(1, 1)]}, {"A": [(1, 1)]}, {"A": [(1, 1)]}]
    scores = {s.group: s for s in overlap.dcm_overlap(base_runs, ft_runs, seed=0, n_resamples=500)}
    a = scores["value_fetcher"]
    per_seed = [0.5, 1.0, 0.0, 0.5]
    assert a.base_in_ft.value == pytest.approx(sum(per_seed) / 4)
    assert a.base_in_ft.n == 4 and a.base_in_ft.method == "bootstrap-over-seeds"
    assert min(per_seed) <= a.base_in_ft.low <= a.base_in_ft.value <= a.base_in_ft.high <= max(per_seed)
    assert a.heads == "dcm" and "all" in scores
    again = {s.group: s for s in overlap.dcm_overlap(base_runs, ft_runs, seed=0, n_resamples=500)}
    assert again["value_fetcher"] == a  # seeded


def test_dcm_overlap_one_seed_and_undefined_seeds():
    (a, _all) = overlap.dcm_overlap([{"A": [(1, 1), (2, 2)]}], [{"A": [(2, 2)]}])
    assert a.base_in_ft.value == 0.5 and a.base_in_ft.low is None and a.base_in_ft.high is None
    assert "no CI" in a.base_in_ft.note
    (a, _all) = overlap.dcm_overlap([{"A": []}, {"A": [(1, 1)]}], [{"A": [(1, 1)]}, {"A": [(1, 1)]}])
    assert a.base_in_ft.value == 1.0 and "1 of 2 seed pairs undefined" in a.base_in_ft.note


def test_selected_by_group_uses_role_desiderata():
    class Fake:
        def selections(self):
            return {("value_fetcher", "object_value"): ((1, 1),), ("value_fetcher", "positional"): ((2, 2),),
                    ("position_detector", "positional"): ((3, 3),)}

    assert overlap.selected_by_group(Fake()) == {"value_fetcher": ((1, 1),), "position_detector": ((3, 3),)}
    assert overlap.selected_by_group(Fake(), {"A": "positional"})["value_fetcher"] == ((2, 2),)


def test_errors_and_table():
    with pytest.raises(EtbenchError, match="one DCM run per seed"):
        overlap.dcm_overlap([{"A": []}], [])
    with pytest.raises(EtbenchError, match=r"\(layer, head\)"):
        overlap.head_overlap([(1, 2, 3)], [])
    with pytest.raises(EtbenchError, match="unknown circuit group"):
        overlap.circuit_overlap({"Z": []}, {})
    table = overlap.format_overlap(overlap.circuit_overlap({"A": [(1, 1)]}, {"A": [(1, 1)]}))
    assert "value_fetcher" in table and "1.000" in table


def _scores(means: dict, n: int = 40, spread: float = 0.0, seed: int = 0) -> dict:
    """Per-prompt effects around given means: ``{group: {head: [effect per prompt]}}``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {g: {h: list(m + spread * rng.standard_normal(n)) for h, m in hs.items()} for g, hs in means.items()}


def test_circuit_overlap_ci_is_zero_width_never_and_wide_when_the_ranking_is_a_coin_toss():
    base = Circuit.from_heads({"A": [[1, 0]], "B": [[5, 0]]})
    ft = Circuit.from_heads({"A": [[1, 0]], "B": [[5, 0]]})
    # well separated heads: every resample picks the same ones, so there is no interval to show
    clear = {"value_fetcher": {(1, 0): -0.5, (2, 0): -0.1}, "position_transmitter": {(5, 0): -0.4, (6, 0): 0.0}}
    rows = {o.group: o for o in overlap.circuit_overlap(base, ft, item_scores=(_scores(clear), _scores(clear)))}
    a = rows["value_fetcher"].base_in_ft
    assert a.value == 1.0 and a.low is None and a.high is None and "same value in all 2000" in a.note
    assert a.method == overlap.CIRCUIT_CI_METHOD
    # two A heads of equal mean effect and noisy prompts: the chosen head flips between resamples,
    # independently for the two models (their per-prompt effects differ), so overlap spans 0..1
    tie = {"value_fetcher": {(1, 0): -0.3, (2, 0): -0.3}, "position_transmitter": {(5, 0): -0.4, (6, 0): 0.0}}
    scores = (_scores(tie, spread=0.5, seed=1), _scores(tie, spread=0.5, seed=2))

    def found(sc):  # what discovery would keep from all 40 prompts: the A head of the lower mean
        a = min(sc["value_fetcher"], key=lambda h: sum(sc["value_fetcher"][h]))
        return Circuit.from_heads({"A": [list(a)], "B": [[5, 0]]})

    rows = {o.group: o for o in overlap.circuit_overlap(found(scores[0]), found(scores[1]), item_scores=scores)}
    a = rows["value_fetcher"].base_in_ft
    assert (a.low, a.high) == (0.0, 1.0) and "resamples of 40 discovery prompts" in a.note
    assert rows["position_transmitter"].jaccard.low is None  # B stays clear-cut
    assert rows["all"].jaccard.low < rows["all"].jaccard.high


def test_circuit_overlap_resample_keeps_sizes_unscored_heads_and_discoverys_a_without_b_rule():
    import numpy as np

    # A's best-scoring head is also B's pick: discovery drops it from A, and so does every resample
    scores = {"value_fetcher": {(5, 0): -0.9, (1, 0): -0.5, (2, 0): -0.1},
              "position_transmitter": {(5, 0): -0.4, (6, 0): 0.0}}
    circuit = {"value_fetcher": {(1, 0), (9, 9)}, "position_transmitter": {(5, 0)}}  # (9, 9): not scored
    draws = np.random.default_rng(0).integers(0, 10, size=(5, 10))
    for redrawn in overlap._redrawn(circuit, _scores(scores, n=10), draws):
        assert redrawn["value_fetcher"] == {(1, 0), (9, 9)} and redrawn["position_transmitter"] == {(5, 0)}


def test_circuit_overlap_without_prompt_scores_has_no_ci():
    base = Circuit.from_heads({"A": [[1, 0]]})
    rows = overlap.circuit_overlap(base, base, item_scores=({}, {}))
    assert all(o.base_in_ft.low is None and o.base_in_ft.method == "exact" for o in rows)
    mismatched = ({"A": {(1, 0): [0.1, 0.2]}}, {"A": {(1, 0): [0.1, 0.2, 0.3]}})  # not the same prompts
    assert overlap.circuit_overlap(base, base, item_scores=mismatched)[0].base_in_ft.method == "exact"


def test_dcm_overlap_equal_at_every_seed_has_no_zero_width_ci():
    runs = [{"value_fetcher": [(1, 1), (2, 2)]}] * 3
    rows = {o.group: o for o in overlap.dcm_overlap(runs, runs)}
    est = rows["value_fetcher"].jaccard
    assert est.value == 1.0 and est.low is None and "same value at all 3 DCM seeds" in est.note


def test_circuit_overlap_of_a_pruned_circuit_has_no_ci():
    # minimality dropped A's best head: re-ranking cannot give this circuit back, so no interval
    scores = {"value_fetcher": {(1, 0): -0.5, (2, 0): -0.4, (3, 0): -0.1}}
    pruned = Circuit.from_heads({"A": [[2, 0]]})
    rows = {o.group: o for o in overlap.circuit_overlap(pruned, pruned, item_scores=(_scores(scores), _scores(scores)))}
    for g in ("value_fetcher", "all"):
        est = rows[g].jaccard
        assert est.value == 1.0 and est.low is None and "not the top of their discovery ranking" in est.note


def test_chance_overlap_matches_random_sets_drawn_from_the_pool():
    """The hypergeometric chance level equals what random fine-tuned sets of the same size give (simulated)."""
    pool, base, n_ft = 40, set(range(8)), 15
    rng = np.random.default_rng(0)
    draws = [set(rng.choice(pool, size=n_ft, replace=False).tolist()) for _ in range(20000)]
    common = np.array([len(base & f) for f in draws])
    jacc = common / (len(base) + n_ft - common)
    observed = 6  # overlap of the "real" fine-tuned set
    chance = overlap.chance_overlap(overlap.Overlap(len(base), n_ft, observed, len(base) + n_ft - observed), pool)
    assert chance.pool == pool and chance.method == "hypergeometric"
    assert chance.base_in_ft == pytest.approx(n_ft / pool)
    assert chance.base_in_ft == pytest.approx(common.mean() / len(base), abs=0.01)
    assert chance.jaccard == pytest.approx(jacc.mean(), abs=0.005)
    assert chance.p_value == pytest.approx((common >= observed).mean(), abs=0.005)


def test_chance_overlap_of_a_set_covering_every_head_says_nothing():
    # a fine-tuned group grown to every head contains every base head: observed 1.0, chance 1.0, p 1
    chance = overlap.chance_overlap(overlap.Overlap(10, 50, 10, 50), 50)
    assert chance.base_in_ft == 1.0 and chance.p_value == pytest.approx(1.0)
    # disjoint sets: p of "at least 0 in common" is 1; a full overlap of small sets is unlikely by chance
    assert overlap.chance_overlap(overlap.Overlap(5, 5, 0, 10), 100).p_value == pytest.approx(1.0)
    assert overlap.chance_overlap(overlap.Overlap(5, 5, 5, 5), 100).p_value < 1e-6
    assert overlap.chance_overlap(overlap.Overlap(0, 5, 0, 5), 100) is None  # base_in_ft undefined
    with pytest.raises(EtbenchError):
        overlap.chance_overlap(overlap.Overlap(10, 60, 10, 60), 50)  # the pool cannot hold the set


def test_circuit_overlap_rows_carry_their_chance_level_when_given_the_pool():
    base = {"A": [[0, 0], [0, 1]], "B": [[1, 0]]}
    ft = {"A": [[0, 0], [1, 1]], "B": [[1, 0], [1, 1]]}
    without = overlap.circuit_overlap(base, ft)
    assert all(o.chance is None for o in without)
    rows = {o.group: o for o in overlap.circuit_overlap(base, ft, pool=4)}
    assert rows["value_fetcher"].chance.base_in_ft == pytest.approx(2 / 4)
    assert rows["all"].chance.base_in_ft == pytest.approx(3 / 4)
    assert "by chance" in overlap.format_overlap(list(rows.values()))


def test_equal_size_overlap_cuts_both_rankings_to_the_smaller_size():
    base = {"A": [[0, 0], [0, 1], [0, 2], [0, 3]], "B": [[1, 0]]}
    # the fine-tuned ranking puts two new heads first and keeps the base's four after them: at the base's
    # size (4) its top holds the new two and the base's first two
    ft = {"A": [[2, 0], [2, 1], [0, 0], [0, 1], [0, 2], [0, 3]], "B": [[1, 0], [1, 1], [1, 2]]}
    rows = {o.group: o for o in overlap.equal_size_overlap(base, ft, pool=20)}
    vf = rows["value_fetcher"]
    assert vf.heads == "circuit-top" and vf.base_in_ft.value == pytest.approx(2 / 4) and vf.base_in_ft.n == 4
    assert vf.jaccard.value == pytest.approx(2 / 6)
    assert vf.base_in_ft.low is None and "no CI" in vf.base_in_ft.note
    assert vf.chance.base_in_ft == pytest.approx(4 / 20)  # equal sizes: chance is k / N
    assert rows["position_transmitter"].base_in_ft.value == 1.0  # cut to 1: the top head is shared
    # as found, the larger fine-tuned set contains every base head
    as_found = {o.group: o for o in overlap.circuit_overlap(base, ft, pool=20)}
    assert as_found["value_fetcher"].base_in_ft.value == 1.0
    # the same circuit: full overlap at any size
    same = {o.group: o for o in overlap.equal_size_overlap(base, base, pool=20)}
    assert all(o.base_in_ft.value == 1.0 for o in same.values())
