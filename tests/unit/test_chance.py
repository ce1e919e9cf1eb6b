"""The chance floor of faithfulness: a ratio over a model accuracy indistinguishable from guessing (its 95% CI
contains 1/n_boxes) is marked wherever the leaderboard and the reports show it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from etbench.core.stats import Estimate
from etbench.metrics.chance import at_chance, chance_accuracy
from etbench.publish import leaderboard as lb
from etbench.publish import report

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scorecards"


@pytest.mark.parametrize("accuracy, n_boxes, flagged", [
    (Estimate(0.138, 0.107, 0.175, 400, "wilson"), 7, True),  # tiny-harmful's 7-box accuracy: 1/7 = 0.143 inside
    (Estimate(0.135, 0.094, 0.189, 200, "wilson"), 7, True),
    (Estimate(0.20, 0.16, 0.25, 400, "wilson"), 7, False),  # clearly above chance
    (Estimate(0.15, 0.1435, 0.16, 400, "wilson"), 7, False),  # the CI's low end just above 1/7
    (Estimate(0.10, 0.08, 0.12, 400, "wilson"), 7, False),  # below chance: not guessing, systematically wrong
    (Estimate(0.32, 0.276, 0.367, 400, "wilson"), 3, True),  # 1/3 at 3 boxes
    (Estimate(0.14, None, None, 0, "reported"), 7, False),  # no CI: nothing to test
    (None, 7, False),
])
def test_at_chance_on_planted_accuracies(accuracy, n_boxes, flagged):
    assert at_chance(accuracy, n_boxes) is flagged
    assert chance_accuracy(7) == pytest.approx(0.142857, abs=1e-6)


@pytest.fixture(scope="module")
def cards():
    """The fixture scorecard as it is (its ft model accuracy 0.708 [0.622, 0.782]), and with the ft model's
    accuracy on the faithfulness prompts planted at chance."""
    found = report._load_found(FIXTURES / "synthetic-ft-a")
    chance = Estimate(0.14, 0.09, 0.21, 120, "wilson")
    faithfulness = [dataclasses.replace(f, model_accuracy=chance) if f.model == "ft" else f
                    for f in found.card.faithfulness]
    return found, dataclasses.replace(found.card, faithfulness=faithfulness)


def test_leaderboard_marks_faithfulness_at_the_chance_floor(cards):
    found, floor = cards
    entries = [lb.Entry("fine", {}, found.card, found.items), lb.Entry("guessing", {}, floor, found.items)]
    rows = {r["name"]: r for r in lb.rows_for(entries, include_paper=False)}
    assert rows["guessing"]["faithfulness_at_chance"] is True and rows["fine"]["faithfulness_at_chance"] is False
    ordered = list(rows.values())
    md = lb.render_markdown(ordered)
    line = {r: next(x for x in md.splitlines() if x.startswith("| ") and f" | {r} | " in x) for r in rows}
    assert f"] {report.CHANCE_MARK} |" in line["guessing"] and report.CHANCE_MARK not in line["fine"]
    assert report.CHANCE_LEGEND in md and "1/7 = 0.143" in report.CHANCE_LEGEND
    page = lb.render_html(ordered)
    assert page.count('class="floor"') == 1 and 'id="legend-chance"' in page
    lines = lb.render_csv(ordered).splitlines()
    at = lines[0].split(",").index("name")
    csv_rows = {r.split(",")[at]: r for r in lines}
    header = csv_rows["name"].split(",")
    column = header.index("faithfulness_at_chance")
    assert header[column - 4] == "faithfulness"  # right after the faithfulness estimate's columns
    assert csv_rows["guessing"].split(",")[column] == "True" and csv_rows["fine"].split(",")[column] == "False"
    data = json.loads(lb.render_json(ordered))
    assert {r["name"]: r["faithfulness_at_chance"] for r in data["rows"]} == {"fine": False, "guessing": True}
    # nothing flagged: no marker and no legend
    clean = [rows["fine"]]
    assert report.CHANCE_MARK not in lb.render_markdown(clean) and 'class="floor"' not in lb.render_html(clean)


def test_report_marks_every_faithfulness_figure_over_a_guessing_model(cards):
    found, floor = cards
    doc = report.scorecard_report(floor, found.items)
    table_row = next(x for x in doc.markdown.splitlines() if x.startswith("| base | ft |"))
    assert table_row.count(report.CHANCE_MARK) == 1  # faithfulness (this fixture has no MIB figure)
    assert next(x for x in doc.markdown.splitlines() if x.startswith("| base | base |")).count(report.CHANCE_MARK) == 0
    paired = [x for x in doc.markdown.splitlines() if x.startswith("| faithfulness")]
    assert paired and all(report.CHANCE_MARK in x for x in paired if "on ft" in x or "difference" in x)
    assert all(report.CHANCE_MARK not in x for x in paired if "on base" in x)
    assert report.CHANCE_LEGEND in doc.markdown and report.CHANCE_MARK in doc.html
    assert report.CHANCE_MARK not in report.scorecard_report(found.card, found.items).markdown
    # a comparison of two fine-tunes, one of them guessing: the faithfulness difference is marked, in the
    # terminal too, with the legend
    comp = report.compare_cards(found.card, found.items, floor, found.items, "fine", "guessing")
    difference = next(g for g in comp.gains if g.label.startswith("faithfulness difference"))
    assert difference.at_chance
    text = report.format_comparison(comp)
    assert report.CHANCE_LEGEND in text and f"{report.CHANCE_MARK} (95% CI" in text
    assert report.CHANCE_LEGEND in report.comparison_report(comp).markdown


def test_score_terminal_tables_mark_it_too(cards):
    from etbench.publish.terminal import format_scorecard

    found, floor = cards
    text = format_scorecard(floor)
    row = next(x for x in text.splitlines() if x.startswith("| base ") and "| ft " in x)
    assert report.CHANCE_MARK in row and report.CHANCE_LEGEND in text
    assert report.CHANCE_MARK not in format_scorecard(found.card)
