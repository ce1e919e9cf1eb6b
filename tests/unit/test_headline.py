"""Headline scores (etbench.metrics.headline) on planted overlaps: chance reads 0, identity 1, the CI is a real
interval (never a point), and the verdict follows the CIs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from etbench.core.stats import proportion_ci
from etbench.metrics import headline
from etbench.schema.scorecard import Estimate, OverlapChance, OverlapScore


def _overlap(found: int, k: int, chance: float, group: str = "all") -> OverlapScore:
    return OverlapScore(heads="circuit-top", group=group,
                        base_in_ft=Estimate(found / k, None, None, k, "exact"),
                        jaccard=Estimate(None, None, None, 0, "exact"),
                        chance=OverlapChance(pool=100, base_in_ft=chance, jaccard=0.0, p_value=1.0))


def test_chance_reads_zero_and_identity_one():
    assert headline.mechanism_reuse(_overlap(5, 20, 0.25)).value == pytest.approx(0.0)
    assert headline.mechanism_reuse(_overlap(20, 20, 0.25)).value == pytest.approx(1.0)
    assert headline.mechanism_reuse(_overlap(0, 20, 0.25)).value == pytest.approx(-1 / 3)  # below chance


def test_ci_is_the_rescaled_wilson_interval_and_never_a_point():
    r = headline.mechanism_reuse(_overlap(20, 20, 0.2))  # every head found: a bootstrap would give [1, 1]
    w = proportion_ci(20, 20)
    assert r.low == pytest.approx((w.low - 0.2) / 0.8) and r.high == pytest.approx(1.0)
    assert r.low < r.value
    r = headline.mechanism_reuse(_overlap(7, 9, 0.1))
    assert r.low < r.value < r.high


def test_undefined_without_chance_heads_or_room_above_chance():
    assert headline.mechanism_reuse(None).value is None
    assert headline.mechanism_reuse(_overlap(3, 3, 1.0)).value is None
    empty = OverlapScore(heads="circuit-top", group="all", base_in_ft=Estimate(None, None, None, 0, "exact"),
                         jaccard=Estimate(None, None, None, 0, "exact"))
    assert "undefined" in headline.mechanism_reuse(empty).note


def test_verdict_follows_the_cis():
    gain = Estimate(None, None, None, 200, "paired-bootstrap", note="undefined")
    up = headline.Headline(Estimate(0.2, 0.1, 0.3, 400, "b"), headline.mechanism_reuse(_overlap(18, 20, 0.2)), {},
                           Estimate(0.9, 0.8, 1.0, 200, "b"))
    text = headline.verdict(up, "m")
    assert "raises" in text and "above chance" in text and "0.90" in text
    flat = headline.Headline(Estimate(0.01, -0.02, 0.04, 400, "b"), headline.mechanism_reuse(_overlap(5, 20, 0.2)),
                             {}, gain)
    text = headline.verdict(flat, "m")
    assert "does not clearly change" in text and "does not clearly reuse" in text and "undefined" in text


def test_verdict_gives_the_reason_gain_explained_is_undefined():
    """The verdict said "no clear accuracy change on the CMAP prompts" for every undefined gain, also for a card
    with no CMAP of the full circuit (a remote run: no DCM heads), whose accuracy change may be clear."""
    reuse = headline.mechanism_reuse(_overlap(18, 20, 0.2))
    no_cmap = headline.Headline(Estimate(0.2, 0.1, 0.3, 400, "b"), reuse, {}, headline.gain_explained(SimpleNamespace(cmap=[])))
    text = headline.verdict(no_cmap, "m")
    assert "no CMAP of the full circuit" in text and "no clear accuracy change" not in text
    gap = Estimate(None, None, None, 200, "paired-bootstrap-percentile",
                   note="ft - base accuracy -0.025 [-0.075, +0.020] is not clearly nonzero: normalised gain undefined")
    flat = headline.Headline(Estimate(0.2, 0.1, 0.3, 400, "b"), reuse, {}, gap)
    assert "no clear accuracy change on the CMAP prompts" in headline.verdict(flat, "m")
