"""etbench.stats checked against values computed by hand and against simulation."""

import math

import numpy as np
import pytest

from etbench.core import stats
from etbench.schema.scorecard import Estimate


def _pairs(both, a_only, b_only, neither):
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return a, b


def test_mcnemar_exact_on_hand_made_table():
    # 10 both right, 2 only A, 8 only B, 5 neither: exact p = 2 * P(Bin(10, 1/2) <= 2) = 2 * 56 / 1024
    a, b = _pairs(10, 2, 8, 5)
    r = stats.mcnemar(a, b, n_resamples=999)
    assert (r.n, r.both, r.a_only, r.b_only, r.neither) == (25, 10, 2, 8, 5)
    assert r.p_value == pytest.approx(112 / 1024)
    assert r.difference.p_value == pytest.approx(112 / 1024)
    assert r.acc_a == pytest.approx(12 / 25) and r.acc_b == pytest.approx(18 / 25)
    assert r.difference.value == pytest.approx(6 / 25)
    assert r.difference.low < 6 / 25 < r.difference.high
    assert r.odds_ratio.value == pytest.approx(4.0)
    assert r.odds_ratio.low < 4.0 < r.odds_ratio.high
    assert r.cohens_g == pytest.approx(0.8 - 0.5)


def test_mcnemar_symmetric_and_degenerate():
    a, b = _pairs(10, 8, 2, 5)
    assert stats.mcnemar(a, b, n_resamples=999).p_value == pytest.approx(112 / 1024)
    same = stats.mcnemar([1, 0, 1], [1, 0, 1], n_resamples=99)
    assert same.p_value == 1.0 and same.odds_ratio.value is None and same.difference.value == 0.0
    assert same.difference.low == same.difference.high == 0.0
    # all discordant pairs one way: 2 * (1/2)^6
    a, b = _pairs(0, 0, 6, 0)
    assert stats.mcnemar(a, b, n_resamples=99).p_value == pytest.approx(2 / 64)


def test_holm_and_bh_on_known_vector():
    p = [0.01, 0.04, 0.03, 0.005]
    holm = stats.adjust_pvalues(p, "holm")
    assert holm.adjusted == pytest.approx((0.03, 0.06, 0.06, 0.02))
    assert holm.reject == (True, False, False, True)
    bh = stats.adjust_pvalues(p, "bh")
    assert bh.adjusted == pytest.approx((0.02, 0.04, 0.04, 0.02))
    assert bh.reject == (True, True, True, True)
    assert stats.adjust_pvalues([], "holm").adjusted == ()
    with pytest.raises(ValueError):
        stats.adjust_pvalues(p, "nope")


def test_bootstrap_mean_coverage_on_simulated_data():
    rng = np.random.default_rng(123)
    true_mean, covered, sims = 0.7, 0, 200
    for i in range(sims):
        x = rng.binomial(1, true_mean, size=60)
        ci = stats.bootstrap_mean(x, seed=i, n_resamples=499, method="percentile")
        covered += ci.low <= true_mean <= ci.high
    assert covered / sims >= 0.90


def test_paired_diff_coverage_on_simulated_data():
    rng = np.random.default_rng(7)
    covered, sims = 0, 100
    for i in range(sims):
        a = rng.normal(0.0, 1.0, size=40)
        b = a + rng.normal(0.3, 0.5, size=40)  # true mean difference 0.3
        ci = stats.paired_bootstrap_diff(a, b, seed=i, n_resamples=499)
        covered += ci.low <= 0.3 <= ci.high
    assert covered / sims >= 0.88


def test_determinism_with_seed_and_seed_matters():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    one = stats.paired_bootstrap_diff(a, b, seed=3, n_resamples=499)
    two = stats.paired_bootstrap_diff(a, b, seed=3, n_resamples=499)
    other = stats.paired_bootstrap_diff(a, b, seed=4, n_resamples=499)
    assert one == two and (one.low, one.high) != (other.low, other.high)
    assert stats.permutation_test_paired(a, b, seed=1, n_resamples=999) == \
        stats.permutation_test_paired(a, b, seed=1, n_resamples=999)


def test_paired_bootstrap_ratio():
    num = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1] * 5
    den = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1] * 5
    r = stats.paired_bootstrap_ratio(num, den, n_resamples=499)
    assert r.value == pytest.approx(7 / 9)
    assert r.low <= 7 / 9 <= r.high <= 1.0 + 1e-12
    undefined = stats.paired_bootstrap_ratio([0, 0], [0, 0])
    assert undefined.value is None and "undefined" in undefined.note


def test_permutation_tests():
    # a large consistent shift is detected; no shift is not
    rng = np.random.default_rng(1)
    a = rng.normal(size=30)
    shifted = stats.permutation_test_paired(a, a + 1.0 + rng.normal(0, 0.1, 30), n_resamples=999)
    assert shifted.p_value < 0.01 and shifted.statistic == pytest.approx(1.0, abs=0.1)
    assert stats.permutation_test_paired(a, a).p_value == 1.0
    ind = stats.permutation_test_independent(rng.normal(size=30), rng.normal(2, 1, size=30), n_resamples=999)
    assert ind.p_value < 0.01
    with pytest.raises(ValueError):
        stats.paired_bootstrap_diff([1, 2], [1, 2, 3])


def test_to_estimate_converts_and_cleans_nan():
    e = stats.to_estimate(stats.proportion_ci(3, 10))
    assert isinstance(e, Estimate) and e.value == pytest.approx(0.3) and e.method == "wilson" and e.n == 10
    empty = stats.to_estimate(stats.proportion_ci(0, 0))
    assert empty.value is None and empty.low is None and empty.note == "no items"
    iv = stats.Interval(0.1, -0.2, math.inf, 5, "paired-bootstrap-BCa", note="x")
    e2 = stats.to_estimate(iv)
    assert (e2.value, e2.low, e2.high, e2.note) == (0.1, -0.2, None, "x")
    assert stats.from_estimate(e2).value == 0.1


def test_ratio_with_constant_differences_still_has_spread():
    # num - den is constant, but num/den varies across resamples: the CI must not collapse to the point
    num, den = [1, 2, 3, 4] * 10, [0, 1, 2, 3] * 10
    r = stats.paired_bootstrap_ratio(num, den, n_resamples=499)
    assert r.value == pytest.approx(2.5 / 1.5) and r.low < r.value < r.high
    same = stats.paired_bootstrap_diff([0, 1, 0, 1], [1, 2, 1, 2], n_resamples=99)
    assert same.low == same.high == same.value == 1.0


def test_generic_paired_bootstrap_of_a_ratio_difference():
    rng = np.random.default_rng(5)
    x = rng.binomial(1, 0.6, 80).astype(float)
    y = np.ones(80)

    def stat(a, b, axis=-1):
        return np.mean(a, axis=axis) / np.mean(b, axis=axis)

    r = stats.paired_bootstrap([x, y], stat, n_resamples=499)
    assert r.value == pytest.approx(x.mean()) and r.low < r.value < r.high
    assert stats.paired_bootstrap([[], []], stat).value is None


def test_ratio_drops_resamples_with_a_zero_denominator_and_says_so():
    # the denominator's mean is small: some resamples have mean 0, and those are dropped, not turned into nan
    den = [1.0] + [0.0] * 15
    num = [1.0] + [0.0] * 15
    r = stats.paired_bootstrap_ratio(num, den, n_resamples=499)
    assert r.value == 1.0 and r.low == 1.0 and r.high == 1.0
    assert "resamples undefined" in r.note


def test_normalised_gain_undefined_when_the_gain_ci_contains_zero():
    """A null fine-tune (tiny-null's case): ft and base differ on a few items each way, so ft - base is ~0
    and its CI straddles 0; the ratio would be unbounded, so it is undefined, with the gain in the note."""
    base = [1.0] * 40 + [0.0] * 60
    ft = [1.0] * 38 + [0.0, 0.0] + [1.0, 1.0, 1.0] + [0.0] * 57  # 2 lost, 3 gained: +0.01
    patched = [1.0] * 41 + [0.0] * 59
    e = stats.normalised_gain(base, ft, patched, seed=0, n_resamples=500)
    assert e.value is None and e.low is None and e.high is None and e.n == 100
    assert "normalised gain undefined" in e.note and "+0.010" in e.note
    # equal accuracies say so
    same = stats.normalised_gain(base, base, patched, seed=0, n_resamples=500)
    assert same.value is None and "ft accuracy equals base accuracy" in same.note


def test_normalised_gain_defined_when_the_gain_is_clear():
    base = [1.0] * 40 + [0.0] * 60
    ft = [1.0] * 80 + [0.0] * 20  # +0.40
    patched = [1.0] * 60 + [0.0] * 40  # half of the gain
    e = stats.normalised_gain(base, ft, patched, seed=0, n_resamples=500)
    assert e.value == pytest.approx(0.5)
    assert e.low < 0.5 < e.high and e.note == ""


def test_cmap_scores_from_item_rows_match_the_run_and_recompute_the_normalised_gain():
    """A scorecard's CMAP rows re-scored from its items: gain and patched accuracy as stored, and the
    normalised gain by today's rule (undefined for a gap whose CI contains 0), whatever a cached stage held."""
    from etbench.metrics.cmap_scores import cmap_score, scores_from_rows

    base = [True] * 40 + [False] * 60
    ft = [True] * 80 + [False] * 20
    patched = [True] * 60 + [False] * 40
    rows = [{"measure": "cmap", "model": m, "variant": "none", "group": "none", "n_boxes": 7, "item": i,
             "correct": c, "heads": "dcm"} for m, flags in (("base", base), ("ft", ft)) for i, c in enumerate(flags)]
    rows += [{"measure": "cmap", "model": "base", "variant": "output", "group": "full", "n_boxes": 7, "item": i,
              "correct": c, "heads": h} for h in ("dcm", "circuit") for i, c in reversed(list(enumerate(patched)))]
    scores = scores_from_rows(rows, seed=0, n_resamples=500)
    assert [(s.heads, s.variant, s.group) for s in scores] == [("dcm", "output", "full"), ("circuit", "output", "full")]
    assert scores[0] == cmap_score("output", "full", base, ft, patched, seed=0, n_resamples=500)
    assert scores[0].gain.value == pytest.approx(0.2) and scores[0].normalised_gain.value == pytest.approx(0.5)
    null = scores_from_rows([{**r, "correct": base[r["item"]]} if r["model"] == "ft" else r for r in rows],
                            seed=0, n_resamples=500)
    assert null[0].normalised_gain.value is None  # ft == base: nothing to normalise by
    assert scores_from_rows([]) == []  # CMAP not run
