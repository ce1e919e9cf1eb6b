"""Pairwise comparisons among fine-tunes of one base (leaderboard matrix), on synthetic fixture scorecards
(NOT RESULTS: seeded random draws with planted accuracies)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from etbench import api
from etbench.core import stats
from etbench.publish import comparisons, report
from etbench.publish import leaderboard as lb
from etbench.schema import scorecard as sc
from fixtures.scorecards import make as fixtures  # the fixture generator (tests/ is on pytest's pythonpath)


def entry(tmp: Path, name: str, **kwargs) -> lb.Entry:
    """A stored-like entry made by the fixture generator (ft_ref = name)."""
    path = fixtures.make(tmp / name, name, **kwargs)
    card = sc.load(path)
    return lb.Entry(name, {"name": name}, card, sc.load_items(path, card))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, lb.Entry]:
    tmp = tmp_path_factory.mktemp("zoo")
    return {
        # planted: 0.9 vs 0.4 accuracy on 120 shared items, drawn independently: a difference of about -0.5
        "strong": entry(tmp, "strong", seed=11, ft_acc=0.9),
        "weak": entry(tmp, "weak", seed=12, ft_acc=0.4),
        # the same draws as "strong" under another name: every answer identical
        "twin": entry(tmp, "twin", seed=11, ft_acc=0.9),
        # alone on its base
        "lonely": entry(tmp, "lonely", base_ref="other-base", seed=13),
    }


@pytest.fixture(scope="module")
def matrix(zoo) -> comparisons.Matrix:
    return comparisons.pair_matrix(list(zoo.values()))


def test_rows_are_grouped_by_base_and_a_row_alone_gets_no_matrix(matrix):
    assert [g.members for g in matrix.groups] == [["strong", "twin", "weak"]]
    assert matrix.groups[0].base == "synthetic-base"
    assert matrix.alone == ["lonely"]
    assert {(c.a, c.b) for c in matrix.groups[0].pairs} == {("strong", "twin"), ("strong", "weak"), ("twin", "weak")}
    assert not any("lonely" in stem for stem in matrix.reports)


def test_planted_difference_is_a_significant_cell(matrix):
    cell = matrix.groups[0].cell("strong", "weak")
    assert cell.status == comparisons.COMPARED and cell.shared_items == 120
    d = cell.accuracy
    assert d.difference == pytest.approx(cell.accuracy_b - cell.accuracy_a)
    assert d.difference < -0.3 and d.high < 0  # weak minus strong
    assert d.p < 1e-6 and d.p_adjusted < 0.05 and cell.significant
    assert cell.cmap_full_gain is not None and cell.cmap_full_gain.n == 120


def test_identical_rows_give_zero_difference_and_p_one(matrix):
    cell = matrix.groups[0].cell("strong", "twin")
    assert cell.status == comparisons.COMPARED
    assert cell.accuracy.difference == 0 and cell.accuracy.p == 1.0 and cell.accuracy.p_adjusted == 1.0
    assert cell.cmap_full_gain.difference == 0
    assert not cell.significant


def test_holm_runs_over_the_whole_matrix(matrix):
    ds = [d for c in matrix.groups[0].pairs for d in (c.accuracy, c.cmap_full_gain) if d is not None]
    assert len(ds) == 6
    want = stats.adjust_pvalues([d.p for d in ds], "holm").adjusted
    assert [d.p_adjusted for d in ds] == pytest.approx(list(want))
    # the family is larger than one pair's: the matrix adjusts more than a lone comparison would
    strong_weak = matrix.groups[0].cell("strong", "weak").cmap_full_gain
    assert strong_weak.p_adjusted >= strong_weak.p


def test_different_protocols_say_so_instead_of_a_number(tmp_path, zoo):
    config = dict(fixtures.CONFIG, seed=1)
    other = entry(tmp_path, "reseeded", seed=11, ft_acc=0.9, config=config)
    m = comparisons.pair_matrix([zoo["strong"], other])
    cell = m.groups[0].cell("reseeded", "strong")
    assert cell.status == comparisons.NOT_COMPARABLE and "seed" in cell.reason
    assert cell.accuracy is None and cell.report is None and not m.reports


def test_items_that_do_not_name_the_same_prompts_are_refused(zoo):
    shifted = zoo["weak"]
    n = fixtures.N_ITEMS
    # same protocol, but item i of this copy is another prompt: its base answers no longer line up
    items = [dict(r, item=(r["item"] + 7) % n) if isinstance(r.get("item"), int) else r for r in shifted.items]
    moved = replace(shifted, name="moved", items=items)
    m = comparisons.pair_matrix([zoo["strong"], moved])
    cell = m.groups[0].cell("moved", "strong")
    assert cell.status == comparisons.NOT_ALIGNED and cell.accuracy is None
    assert cell.shared_items == n and cell.base_answers_agree < n * (1 - comparisons.MAX_BASE_DISAGREEMENT)


def test_rendered_matrix_links_every_compared_cell(matrix):
    page = comparisons.render_html(matrix)
    cells = re.findall(r'<td class="pair[^"]*" data-a="([^"]+)" data-b="([^"]+)"', page)
    assert sorted(cells) == [("strong", "twin"), ("strong", "weak"), ("twin", "weak")]
    assert page.count('class="pair significant"') == sum(c.significant for c in matrix.groups[0].pairs) >= 2
    for c in matrix.groups[0].pairs:
        assert f'href="{c.report}"' in page
    md = "\n".join(comparisons.render_markdown(matrix))
    assert "(reports/compare/strong__weak.md)" in md and "Δacc: -0." in md
    data = json.loads(json.dumps(comparisons.to_json(matrix)))
    assert data["schema_version"] == comparisons.SCHEMA_VERSION and data["alone_on_their_base"] == ["lonely"]
    assert comparisons.render_html(comparisons.pair_matrix([])) == ""


def test_pair_report_is_what_etbench_compare_writes(tmp_path, matrix):
    store = tmp_path / "results"
    for name, seed, acc in (("strong", 11, 0.9), ("weak", 12, 0.4)):  # as the zoo fixture made them
        fixtures.make(store / name, name, seed=seed, ft_acc=acc)
    comp = api.compare("strong", "weak", store=[store])
    assert matrix.reports["reports/compare/strong__weak"] == report.comparison_report(comp)


def test_no_error_bars_without_a_real_ci():
    ci = stats.Interval(0.2, 0.1, 0.3, 50, "paired-bootstrap")
    point = stats.Interval(0.2, 0.2, 0.2, 1, "bootstrap-over-seeds")  # [x, x]: not a CI
    bare = stats.Interval(0.2, None, None, 0, "reported")
    assert report.has_ci(ci) and not report.has_ci(point) and not report.has_ci(bare)

    def bars(x, y):
        svg = report.fig_gain_vs_cmap([report.PlotPoint("m", {"cmap_gain": x, "accuracy_gain": y})])
        return svg.count('<g id="LineCollection_')

    assert bars(ci, ci) == 2 and bars(ci, point) == 1 and bars(point, bare) == 0
    overlap = report.fig_group_overlap([report.PlotPoint("m", {"dcm/value_fetcher": ci, "dcm/position_detector": point})],
                                       (("circuit", "circuit heads"), ("dcm", "DCM heads")))
    assert overlap.count('<g id="LineCollection_') == 1 and "circuit heads" not in overlap  # empty panel left out
