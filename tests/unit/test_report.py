"""etbench compare / report on synthetic fixture scorecards (not results)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from etbench.cli import app
from etbench.core import stats
from etbench.core.errors import EtbenchError
from etbench.metrics import headline
from etbench.publish import report
from etbench.schema import scorecard as sc

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scorecards"


@pytest.fixture(scope="module")
def card_a():
    return report._load_found(FIXTURES / "synthetic-ft-a")


def test_within_card_accuracy_matches_a_direct_mcnemar(card_a):
    comp = report.compare_within(card_a.card, card_a.items)
    seven = next(t for t in comp.accuracy if t.n_boxes == 7)
    base = [r["correct"] for r in card_a.items if r["measure"] == "accuracy" and r["model"] == "base"
            and r["n_boxes"] == 7]
    ft = [r["correct"] for r in card_a.items if r["measure"] == "accuracy" and r["model"] == "ft"
          and r["n_boxes"] == 7]
    direct = stats.mcnemar(base, ft, n_resamples=200)
    assert seven.p_value == pytest.approx(direct.p_value)
    assert seven.result.acc_b == pytest.approx(card_a.card.accuracy[-1].accuracy.value)
    # the Holm family is every test of this comparison
    assert len(comp.holm.adjusted) == len(comp.p_values()) and all(
        a >= p for a, p in zip(comp.holm.adjusted, comp.p_values()))
    full = next(g for g in comp.gains if g.label == "CMAP gain, full")
    score = next(c for c in card_a.card.cmap if c.group == "full")
    assert full.interval.value == pytest.approx(score.gain.value)


def test_cross_card_comparison_and_incomparable_configs(card_a):
    b = report._load_found(FIXTURES / "synthetic-ft-b")
    comp = report.compare_cards(card_a.card, card_a.items, b.card, b.items)
    assert [t.n_boxes for t in comp.accuracy] == [3, 5, 7]
    assert any(g.label.startswith("CMAP gain difference") for g in comp.gains)
    other = sc.Scorecard(**{**b.card.__dict__, "config": {**b.card.config, "seed": 1}})
    with pytest.raises(EtbenchError, match="not comparable.*seed 0 vs 1"):
        report.compare_cards(card_a.card, card_a.items, other, b.items)


def test_compare_cli_by_refs_prints_mcnemar_and_cmap_ci(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(FIXTURES / "synthetic-ft-a", store / "synthetic-ft-a")
    result = CliRunner().invoke(app, ["compare", "synthetic-base", "synthetic-ft-a", "--store", str(store),
                                      "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "accuracy, 7 boxes" in result.output and "exact McNemar p =" in result.output
    assert "CMAP gain, full:" in result.output and "95% CI" in result.output
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<svg" not in html or "http://" not in html.split("<svg", 1)[0]
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# synthetic-base vs synthetic-ft-a")


def test_missing_scorecard_is_a_clear_error(tmp_path):
    with pytest.raises(EtbenchError, match="no scorecard of 'tiny-base' vs 'tiny-ft'.*etbench score --base tiny-base"):
        report.resolve_pair("tiny-base", "tiny-ft", [tmp_path])
    with pytest.raises(EtbenchError, match="no scorecard for 'nope'"):
        report.resolve_pair(str(FIXTURES / "synthetic-ft-a"), "nope", [tmp_path])


def test_scorecard_report_has_tables_figures_and_is_deterministic(card_a):
    one = report.scorecard_report(card_a.card, card_a.items)
    two = report.scorecard_report(card_a.card, card_a.items)
    assert one == two
    assert one.html.count("<svg") == 4  # reuse by group (the key figure), CMAP by group, head map, accuracy
    assert "default-src 'none'" in one.html and "Paired comparison" in one.markdown
    assert "exact McNemar" in one.markdown and "Head overlap" in one.markdown


def test_scorecard_report_starts_with_the_answer(card_a):
    """The summary (verdict, headline scores) and the key figure come before any table; the verdict is the
    headline's, and the head map carries its group legend."""
    doc = report.scorecard_report(card_a.card, card_a.items, title="synthetic-ft-a")
    md, page = doc.markdown, doc.html
    assert md.index("## Summary") < md.index("## Paired comparison") < md.index("## Accuracy")
    top = report.headline_of(card_a.card, card_a.items)
    assert f"**{headline.verdict(top, 'synthetic-ft-a')}**" in md
    for label in ("Δaccuracy (ft − base, 7 boxes)", "mechanism reuse (all groups)", "gain explained"):
        assert f"| {label} |" in md
    first_svg = page.index("<svg")
    assert page.index('id="summary"') < first_svg < page.index("</section>") < page.index("<h2>Paired comparison")
    assert "Mechanism reuse" in page[first_svg:page.index("</svg>", first_svg)]
    head_map = page[page.index('aria-label="circuit head overlap"'):]
    assert "A: value fetcher" in head_map and "both circuits" in head_map


def test_circuit_size_note_matches_the_sizing_curve():
    """A circuit whose A group gave heads to B: the note names both counts and the group's change."""
    circuit = sc.CircuitSummary(name="ft", found_on="ft", method="given", size_rule="faithfulness",
                                heads={"value_fetcher": [[0, 0], [0, 1]], "position_transmitter": [[0, 2]]},
                                sizing={"chosen": {"value_fetcher": 3, "position_transmitter": 1}})
    note = report.circuit_size_note(circuit)
    assert "holds 3 nodes" in note and "at 4" in note and "A 3 → 2" in note
    same = sc.CircuitSummary(name="base", found_on="base", method="given", size_rule="faithfulness", heads={"value_fetcher": [[0, 0]]},
                             sizing={"chosen": {"value_fetcher": 1}})
    assert "are the sizing curve's point" in report.circuit_size_note(same)


def test_report_without_items_falls_back_to_scorecard_estimates(card_a):
    comp = report.compare_within(card_a.card, [])
    assert comp.accuracy == [] and comp.notes
    assert all(not g.from_items for g in comp.gains)
    assert report.format_comparison(comp)


def test_bh_correction_option(card_a, tmp_path):
    comp = report.with_correction(report.compare_within(card_a.card, card_a.items), "bh")
    assert comp.holm.method == "bh" and "(BH " in report.format_comparison(comp)
    with pytest.raises(EtbenchError, match="holm' or 'bh'"):
        report.with_correction(comp, "sidak")


def test_report_lists_dcm_results(card_a):
    dcm = sc.DcmScore("base", "value_fetcher", "object_value", [[1, 2], [3, 0]],
                      sc.Estimate(0.9, 0.8, 0.95, 100, "wilson"))
    card = sc.Scorecard(**{**card_a.card.__dict__, "dcm": [dcm]})
    doc = report.scorecard_report(card, card_a.items)
    assert "| base | value_fetcher | object_value | 2 | 0.900 [0.800, 0.950] |" in doc.markdown


def test_reads_cmap_rows_as_etbench_cmap_writes_them():
    """Rows from etbench.cmap.CmapResult.item_rows feed the paired CMAP test (no model needed)."""
    import random

    from etbench.metrics.cmap import CmapResult, CmapRun

    rng = random.Random(0)
    base = tuple(rng.random() < 0.4 for _ in range(60))
    ft = tuple(rng.random() < 0.8 for _ in range(60))
    patched = tuple(b or (f and rng.random() < 0.7) for b, f in zip(base, ft))
    result = CmapResult("b", "f", 7, base, ft, [CmapRun("output", "full", {}, patched)])
    scores = result.scores(n_resamples=500)
    card = sc.Scorecard(**{**report._load_found(FIXTURES / "synthetic-ft-a").card.__dict__, "cmap": scores})
    tests = report.cmap_tests(card, result.item_rows())
    assert len(tests) == 1 and tests[0].from_items
    assert tests[0].interval.value == pytest.approx(scores[0].gain.value)
    assert tests[0].p_value == stats.mcnemar(base, patched, n_resamples=99).p_value


def test_report_and_terminal_show_ceilings_mib_sizing_and_cmap_head_sets(card_a):
    from etbench.publish.terminal import format_scorecard

    e = sc.Estimate(0.5, 0.4, 0.6, 100, "wilson")
    ceiling = sc.CeilingScore("base", "paper", e, e, sc.Estimate(0.3, 0.2, 0.4, 100, "wilson"),
                              sc.Estimate(0.02, 0.0, 0.07, 100, "wilson"), sc.Estimate(0.6, 0.45, 0.8, 100, "ratio"),
                              sc.Estimate(0.59, 0.44, 0.79, 100, "mib"))
    circuits = [sc.CircuitSummary(**{**c.__dict__, "size_rule": "faithfulness",
                                     "sizing": {"target_faithfulness": 0.54, "reached": False,
                                                "note": "target 0.540 not reached"}})
                for c in card_a.card.circuits]
    cmap = [sc.CmapScore(**{**c.__dict__, "heads": "circuit"}) for c in card_a.card.cmap]
    card = sc.Scorecard(**{**card_a.card.__dict__, "ceilings": [ceiling], "circuits": circuits, "cmap": cmap})
    doc = report.scorecard_report(card, card_a.items)
    assert "Ceilings of the circuit form" in doc.markdown and "form faithfulness (MIB)" in doc.markdown
    assert "target 0.540 not reached" in doc.markdown and "| circuit " in doc.markdown
    text = format_scorecard(card)
    assert "ceilings of the circuit form" in text and "0.300 [0.200, 0.400]" in text
    # the random-circuit range is min/max over draws, under a header that says "95% CI" for the others
    assert "random circuit acc (mean [min, max] over draws)" in text


def test_sizing_of_a_model_at_zero_accuracy_and_the_growth_curve_are_shown(card_a):
    # a fine-tune at 0 accuracy: grow_circuit's target is NaN, stored as null (JSON has no NaN)
    from etbench.publish.terminal import format_scorecard

    undefined = {"target_fraction": 0.9, "target_faithfulness": None, "reached": False, "chosen": {},
                 "note": "nothing to grow: the model or the form's ceiling scores 0 on these prompts", "curve": []}
    grown = {"target_fraction": 0.9, "target_faithfulness": 0.434, "reached": False, "chosen": {},
             "note": "target 0.434 not reached: the best circuit reached 0.300 (form ceiling 0.482)",
             "curve": [{"size": 0, "faithfulness": 0.07}, {"size": 27, "faithfulness": 0.21},
                       {"size": 1080, "faithfulness": 0.3}]}
    circuits = [sc.CircuitSummary(**{**c.__dict__, "size_rule": "faithfulness", "sizing": s})
                for c, s in zip(card_a.card.circuits, (undefined, grown))]
    card = sc.Scorecard(**{**card_a.card.__dict__, "circuits": circuits})
    doc = report.scorecard_report(card, card_a.items)
    assert "target undefined" in doc.markdown and "nothing to grow" in doc.markdown
    assert "0→0.070, 27→0.210, 1080→0.300" in doc.markdown  # the curve: the record of the search
    text = format_scorecard(card)
    assert "not reached" in text and "27→0.210" in text and "target undefined" in text


def test_comparisons_print_no_width_zero_interval():
    # a ratio of a circuit that keeps no item is 0 in every resample: "0.000 [0.000, 0.000]" read as certainty
    point = stats.Interval(0.0, 0.0, 0.0, 50, "paired-bootstrap-percentile", note="no variation across items")
    wide = stats.Interval(0.2, 0.1, 0.3, 50, "paired-bootstrap-percentile")
    comp = report.Comparison("t", "a", "b", gains=[report.GainTest("faithfulness of the ft circuit on ft", point, None,
                                                                   "", True),
                                                   report.GainTest("CMAP gain, full", wide, 0.01, "perm", True)])
    text = report.format_comparison(comp)
    assert "[0.000, 0.000]" not in text and "[0.100, 0.300]" in text
    rows = report._comparison_rows(comp)
    assert "[0.000, 0.000]" not in rows[0][1] and "no variation across items" in rows[0][4]


def test_compare_of_a_scorecard_with_itself_is_a_usage_error(tmp_path):
    """``etbench compare X X`` printed a comparison whose differences were exactly 0 with intervals of width zero
    (or, for one file named twice, silently compared X's base with its fine-tune). Both sides naming one
    scorecard (the same argument, one resolved file, or one row name) is now one error line saying which."""
    from support.commands import assert_one_line_error, etbench

    store = tmp_path / "store"
    shutil.copytree(FIXTURES / "synthetic-ft-a", store / "synthetic-ft-a")
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURES / "synthetic-ft-a", copy)
    card = store / "synthetic-ft-a"
    with pytest.raises(EtbenchError, match="'synthetic-ft-a' twice"):
        report.resolve_pair("synthetic-ft-a", "synthetic-ft-a", [store])
    with pytest.raises(EtbenchError, match="same scorecard file"):  # a name and its own directory, or two spellings
        report.resolve_pair("synthetic-ft-a", str(card), [store])
    with pytest.raises(EtbenchError, match="same scorecard file"):
        report.resolve_pair(str(card), str(card / "scorecard.json"), [store])
    with pytest.raises(EtbenchError, match="the row 'synthetic-ft-a'"):  # a copy of the card: another file, one row
        report.resolve_pair(str(card), str(copy), [store])
    # two different scorecards still compare
    assert report.resolve_pair(str(card), str(FIXTURES / "synthetic-ft-b"), [store]).title.endswith("synthetic-ft-b")
    result = etbench("compare", str(card), str(card), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert_one_line_error(result, "twice")
    assert result.stdout == "" and not (tmp_path / "rep").exists()


def test_prompt_sets_note_names_each_accuracy_with_its_prompts(card_a):
    """The two accuracies a report shows for one model are told apart by their prompt sets, counted from the rows."""
    note = report.prompt_sets_note(card_a.card, card_a.items)
    acc = [r for r in card_a.items if r["measure"] == "accuracy" and r["model"] == "base" and r["n_boxes"] == 7]
    faith = {r["item"] for r in card_a.items if r["measure"] == "circuit_accuracy" and r["model"] == "base"
             and r.get("circuit") == "base"}
    share = sum(r["correct"] for r in acc) / len(acc)
    assert f"{share:.3f} of the {len(acc)} accuracy prompts" in note
    assert f"of the {len(faith)} faithfulness prompts" in note
    assert report.prompt_sets_note(card_a.card, []) is None
