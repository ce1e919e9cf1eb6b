"""Known answers on the committed leaderboard rows (issue #13): rows whose effect is known before any
measurement, checked on the scorecards in ``submissions/results/`` (JSON and items only: no model runs).

Each property was written down before its row was scored; a row that fails one is a finding about the
metric, reported, never a row to drop or a threshold to move.

* ``tiny-null`` (trained on tiny-base's own answers): accuracy unchanged (the paired 7-box difference's
  95% CI contains 0), so CMAP has no gap to explain (its normalised gain is undefined) and the full
  CMAP gain's CI contains 0;
* ``tiny-harmful`` (wrong bindings): 7-box accuracy drops, exact McNemar p < 0.01, and the full CMAP gain
  is negative (its 95% CI below 0);
* ``tiny-planted-a`` (trained with the base circuit's value fetchers ablated): its value-fetcher
  overlap with the base circuit (at equal size) stands less far above chance than the null row's;
* edges (docs/method.md §13; both cards carry the section, added with ``etbench submit --add-edges``):
  ``tiny-null`` shows little rewiring (its B->A rewiring well below its chance level, the interval's top too),
  and ``tiny-planted-a`` rewires into A (its B->A rewiring above the null row's).

A row not yet scored under the standard protocol is skipped, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etbench.core.stats import mcnemar
from etbench.schema import scorecard as sc

RESULTS = Path(__file__).resolve().parents[2] / "submissions" / "results"


def _row(name: str) -> tuple[sc.Scorecard, list[dict]]:
    if not (RESULTS / name / "scorecard.json").is_file():
        pytest.skip(f"{name} is not on the leaderboard yet (not scored under the standard protocol)")
    card = sc.load(RESULTS / name / "scorecard.json")
    items = [json.loads(line) for line in (RESULTS / name / card.items_file).read_text().splitlines()]
    return card, items


def _accuracy_flags(items: list[dict], model: str, n_boxes: int = 7) -> list[bool]:
    rows = sorted((r for r in items if r["measure"] == "accuracy" and r["model"] == model
                   and r["n_boxes"] == n_boxes), key=lambda r: r["item"])
    return [r["correct"] for r in rows]


def _paired_accuracy(name: str):
    card, items = _row(name)
    base, ft = _accuracy_flags(items, "base"), _accuracy_flags(items, "ft")
    assert len(base) == len(ft) == card.config["preset"]["accuracy_n"]
    return mcnemar(base, ft)


def _cmap(card: sc.Scorecard, group: str) -> sc.CmapScore:
    return next(c for c in card.cmap if c.group == group and c.variant == "output" and c.heads == "dcm")


def _value_fetcher_overlap(card: sc.Scorecard) -> sc.OverlapScore:
    # the circuits cut to equal size: sized circuits differ several-fold in size
    return next(o for o in card.overlap if o.heads == "circuit-top" and o.group == "value_fetcher")


def test_null_row_accuracy_unchanged():
    test = _paired_accuracy("tiny-null")
    d = test.difference
    assert d.low <= 0 <= d.high, f"tiny-null moved 7-box accuracy by {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def test_null_row_leaves_cmap_nothing_to_explain():
    card, _ = _row("tiny-null")
    full = _cmap(card, "full")
    assert full.normalised_gain.value is None and "undefined" in full.normalised_gain.note
    assert full.gain.low <= 0 <= full.gain.high, f"CMAP full gain {full.gain.value:+.3f} on a null fine-tune"


def test_harmful_row_accuracy_drops():
    test = _paired_accuracy("tiny-harmful")
    assert test.difference.value < 0 and test.p_value < 0.01, (test.difference.value, test.p_value)


def test_harmful_row_cmap_gain_is_negative():
    # the fine-tune's heads carry wrong bindings: patching them into the base makes it worse
    card, _ = _row("tiny-harmful")
    full = _cmap(card, "full")
    assert full.gain.high < 0, f"CMAP full gain {full.gain.value:+.3f} [{full.gain.low:+.3f}, {full.gain.high:+.3f}]"


def test_planted_row_value_fetchers_less_shared_than_the_null_rows():
    planted, _ = _row("tiny-planted-a")
    null, _ = _row("tiny-null")
    p, n = _value_fetcher_overlap(planted), _value_fetcher_overlap(null)
    # compared by the distance above chance (k / N at equal size k, which differs between the rows)
    excess = {name: o.base_in_ft.value - o.chance.base_in_ft for name, o in (("planted", p), ("null", n))}
    assert excess["planted"] < excess["null"], excess


# ---------------------------------------------------------------------------------------------
# The headline scores (docs/method.md, "Headline scores") as the leaderboard shows them (issue #25)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def board_rows() -> dict[str, dict]:
    from etbench.publish import leaderboard as lb

    entries = lb.load_entries(RESULTS)
    if not {"tiny-null", "tiny-harmful", "tiny-planted-a"} <= {e.name for e in entries}:
        pytest.skip("the known-answer rows are not all on the leaderboard yet")
    return {r["name"]: r for r in lb.rows_for(entries, include_paper=False)}


def test_null_row_reuses_the_base_circuit_and_keeps_its_accuracy(board_rows):
    row = board_rows["tiny-null"]
    reuse, change = row["reuse"], row["accuracy_gain"]
    assert reuse["low"] is not None and reuse["low"] > 0 and reuse["high"] > reuse["low"], reuse  # a real CI
    assert change["low"] <= 0 <= change["high"], change
    assert row["gain_explained"]["value"] is None  # nothing to explain


def test_harmful_row_ranks_last_on_accuracy_change_among_its_base(board_rows):
    group = [r for r in board_rows.values() if r["group"] == board_rows["tiny-harmful"]["group"]]
    assert len(group) > 1
    assert max(r["rank"] for r in group) == board_rows["tiny-harmful"]["rank"]
    assert min(r["accuracy_gain"]["value"] for r in group) == board_rows["tiny-harmful"]["accuracy_gain"]["value"]


def test_planted_row_reuses_value_fetchers_less_than_the_null_row(board_rows):
    planted = board_rows["tiny-planted-a"]["reuse_by_group"]["value_fetcher"]["value"]
    null = board_rows["tiny-null"]["reuse_by_group"]["value_fetcher"]["value"]
    assert planted < null, (planted, null)


def _b_to_a(name: str) -> sc.EdgeTypeScore:
    card, _ = _row(name)
    assert card.edges is not None, f"{name} carries no edges section (add it: etbench submit --add-edges)"
    return next(r for r in card.edges.rows if r.type == "B->A")


def test_null_row_rewires_its_edges_far_less_than_chance():
    null = _b_to_a("tiny-null")
    by_chance = 1 - null.chance.base_in_ft
    # "well below": the whole 95% interval under half the chance level, and the overlap's p-value tiny
    assert null.rewiring.high is not None and null.rewiring.high < by_chance / 2
    assert null.chance.p_value < 1e-6


def test_planted_row_rewires_into_the_value_fetchers_more_than_the_null_row():
    planted, null = _b_to_a("tiny-planted-a"), _b_to_a("tiny-null")
    assert planted.rewiring.value > null.rewiring.value
    # and further than the null row's interval reaches
    assert planted.rewiring.value > null.rewiring.high
