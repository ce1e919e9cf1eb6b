"""robustness.json without a model: the robustness figures' definition on planted rows, the diffing summary per
circuit group, and the re-derivation that refuses a file whose summary its rows do not give."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest

from etbench.core.errors import EtbenchError
from etbench.core.io import dumps_json
from etbench.metrics import robustness as rb
from etbench.publish import leaderboard as lb
from etbench.publish import report
from etbench.schema import scorecard as sc
from etbench.schema.circuit import POSITION_CLASSES

ROOT = Path(__file__).resolve().parents[2]
ROW = ROOT / "submissions" / "results" / "tiny-null"
WORDINGS = ["paper", "stored", "bin"]


def _flags(k: int, n: int) -> list[bool]:
    return [i < k for i in range(n)]


def _items(spec: dict[tuple[str, str], tuple[list[bool], list[bool]]]) -> list[rb.WordingItems]:
    return [rb.WordingItems(w, m, list(mc), list(cc)) for (w, m), (mc, cc) in spec.items()]


def _diff(n_layers: int = 2, n_heads: int = 4, n_kv: int = 2, n: int = 5, seed: int = 0) -> rb.DiffItems:
    rng = random.Random(seed)
    return rb.DiffItems(n, {pc: [[rng.random() for _ in range(n)] for _ in range(n_layers)] for pc in POSITION_CLASSES},
                        {pc: [[rng.random() for _ in range(n_heads)] for _ in range(n_layers)] for pc in POSITION_CLASSES},
                        {k: [[rng.random() + 0.1 for _ in range(n_kv if k in "kv" else n_heads)] for _ in range(n_layers)]
                         for k in rb.WEIGHT_KINDS},
                        {k: [[4] * (n_kv if k in "kv" else n_heads) for _ in range(n_layers)] for k in rb.WEIGHT_KINDS})


TOY_CIRCUITS = {"base": {"value_fetcher": [[1, 0], [1, 1]], "position_transmitter": [[1, 2]],
                         "position_detector": [[0, 3]], "structure_reader": [[0, 0]]},
                "ft": {"value_fetcher": [[1, 0]], "position_transmitter": [[1, 2]], "position_detector": [[0, 3]],
                       "structure_reader": [[0, 0]]}}


def test_carryover_is_held_out_faithfulness_minus_the_papers():
    n = 40
    # ft: faithful 0.5 on the paper's wording (20 of 40 correct, circuit 10), 1.0 on both held-out wordings
    spec = {("paper", "ft"): (_flags(20, n), _flags(10, n)), ("stored", "ft"): (_flags(20, n), _flags(20, n)),
            ("bin", "ft"): (_flags(30, n), _flags(30, n))}
    # base: 20 of 40 in every wording, so the fine-tune's gain is 0 on paper and stored, +0.25 on bin
    spec.update({(w, "base"): (_flags(20, n), _flags(10, n)) for w in WORDINGS})
    s = rb.summarise(_items(spec), _diff(), TOY_CIRCUITS, WORDINGS, seed=0)
    assert s.carryover["ft"].value == pytest.approx(1.0 - 0.5)
    assert s.carryover["base"].value == pytest.approx(0.0)
    assert s.carryover["ft"].low <= s.carryover["ft"].value <= s.carryover["ft"].high
    # held-out mean gain 0.125 minus the paper wording's 0
    assert s.gain_carryover.value == pytest.approx(0.125)
    assert s.pick_faithfulness("paper", "ft").faithfulness.value == pytest.approx(0.5)
    assert s.pick_accuracy("bin", "ft").vs_paper.value == pytest.approx(0.25)


def test_a_model_against_its_copy_carries_its_gain_exactly():
    n = 30
    rng = random.Random(1)
    spec = {}
    for w in WORDINGS:
        flags = [rng.random() < 0.6 for _ in range(n)]
        circ = [f and rng.random() < 0.7 for f in flags]
        spec[(w, "base")] = spec[(w, "ft")] = (flags, circ)
    s = rb.summarise(_items(spec), _diff(), {"base": TOY_CIRCUITS["base"], "ft": TOY_CIRCUITS["base"]}, WORDINGS, 0)
    g = s.gain_carryover
    assert g.value == 0 and g.low == g.high == 0  # every resample gives 0: no interval
    assert all(x.gain.value == 0 and x.mcnemar_p == 1 for x in s.gain)
    assert s.carryover["base"] == s.carryover["ft"]
    for w in WORDINGS:
        assert s.pick_accuracy(w, "base") == dataclasses.replace(s.pick_accuracy(w, "ft"), model="base")


def test_group_diffs_average_over_the_groups_heads_and_the_rest():
    diff = _diff(n_layers=2, n_heads=4, n_kv=2)
    for layer, head in ((1, 0), (1, 1)):  # the value fetchers' W_Q unchanged
        diff.weight_delta["q"][layer][head] = 0.0
        diff.weight_rank["q"][layer][head] = 0
    rows = {(g.group, g.position): g for g in rb.group_diffs(diff, TOY_CIRCUITS["base"], seed=0)}
    a = rows[("value_fetcher", "last")]
    assert a.heads == 2 and a.weight_delta["q"].value == 0 and a.weight_rank["q"].value == 0
    assert a.weight_rank["z"].value == 4
    # k/v per KV head: heads 0, 1 of layer 1 read KV head 0 (two query heads per KV head)
    assert a.weight_delta["k"].value == pytest.approx(diff.weight_delta["k"][1][0])
    assert a.z_difference.value == pytest.approx((diff.heads["last"][1][0] + diff.heads["last"][1][1]) / 2)
    other = rows[("other", "query_label")]
    assert other.heads == 8 - 5  # 5 distinct heads in the circuit ((1, 2) and (0, 3) once each)
    assert other.weight_rank["q"].value == 4


def _row_file(tmp_path: Path) -> tuple[Path, rb.Robustness, sc.Scorecard, list]:
    """A copy of the committed tiny-null row with a robustness file whose paper rows are the card's."""
    row = tmp_path / "submissions" / "results" / "tiny-null"
    row.mkdir(parents=True)
    for name in ("scorecard.json", "items.jsonl", "submission.json"):
        shutil.copy(ROW / name, row / name)
    card = sc.load(row / "scorecard.json")
    items = sc.load_items(row / "scorecard.json", card)
    n = 30
    rows = [rb.paper_rows(items, m, 7, n) for m in rb.MODELS]
    rng = random.Random(2)
    for w in WORDINGS[1:]:
        for m in rb.MODELS:
            flags = [rng.random() < 0.5 for _ in range(n)]
            rows.append(rb.WordingItems(w, m, flags, [f and rng.random() < 0.6 for f in flags]))
    circuits = rb.card_circuits(card)
    diff = _diff(n_layers=card.base.n_layers, n_heads=card.base.n_heads, n_kv=3)
    rob = rb.Robustness("tiny-null", card.base.ref, card.ft.ref,
                        rb.card_sha256(card), 0, 7, n, 20,
                        rb.card_mean_n(card), WORDINGS, circuits, rows, diff,
                        rb.summarise(rows, diff, circuits, WORDINGS, 0))
    return row, rob, card, items


def test_a_file_re_derives_and_a_forged_summary_is_refused(tmp_path):
    row, rob, card, items = _row_file(tmp_path)
    rb.check(rob, card, items)
    again = rb.Robustness.from_dict(json.loads(dumps_json(rob.to_dict())))
    assert again == rob
    forged = json.loads(dumps_json(rob.to_dict()))
    forged["summary"]["carryover"]["ft"]["value"] += 0.01
    with pytest.raises(EtbenchError, match=r"summary\.carryover\.ft\.value"):
        rb.check(rb.Robustness.from_dict(forged), card, items)
    forged = json.loads(dumps_json(rob.to_dict()))
    forged["summary"]["groups"][0]["weight_rank"]["q"]["high"] = 99.0
    with pytest.raises(EtbenchError, match=r"summary\.groups\.0\.weight_rank\.q\.high"):
        rb.check(rb.Robustness.from_dict(forged), card, items)
    # rows that are not the card's own paper-wording items
    flipped = dataclasses.replace(rob, items=[dataclasses.replace(r, model_correct=[not x for x in r.model_correct])
                                              if r.wording == "paper" and r.model == "ft" else r for r in rob.items])
    with pytest.raises(EtbenchError, match="paper-wording rows are not the scorecard's"):
        rb.check(flipped, card, items)
    with pytest.raises(EtbenchError, match="another scorecard"):
        rb.check(dataclasses.replace(rob, scorecard_sha256="0" * 64), card, items)


def test_the_board_refuses_a_forged_file_and_keeps_the_row(tmp_path):
    row, rob, card, items = _row_file(tmp_path)
    rb.write(rob, row)
    problems: list[str] = []
    entries = lb.load_entries(row.parent, problems=problems)
    assert [e.name for e in entries] == ["tiny-null"] and entries[0].robustness == rob and not problems
    forged = json.loads((row / rb.FILE_NAME).read_text())
    forged["summary"]["gain_carryover"]["value"] = 0.5
    (row / rb.FILE_NAME).write_text(json.dumps(forged))
    entries = lb.load_entries(row.parent, problems=problems)
    assert [e.name for e in entries] == ["tiny-null"] and entries[0].robustness is None
    assert len(problems) == 1 and "gain_carryover" in problems[0]
    with pytest.raises(EtbenchError, match="gain_carryover"):
        lb.load_entries(row.parent)  # no problems list: raised


def test_report_and_board_show_the_file_or_say_there_is_none(tmp_path):
    row, rob, card, items = _row_file(tmp_path)
    doc = report.scorecard_report(card, items, title="tiny-null", robust=rob)
    assert "Template robustness" in doc.markdown and "Model diffing by base circuit group" in doc.markdown
    assert "gain carry-over" in doc.markdown and report.ROBUSTNESS_ABSENT not in doc.markdown
    assert "accuracy by wording and robustness" in doc.html and "<svg" in doc.html
    bare = report.scorecard_report(card, items, title="tiny-null")
    assert report.ROBUSTNESS_ABSENT in bare.markdown and "Template robustness (" not in bare.markdown
    entries = [lb.Entry("tiny-null", {}, card, items, rob), lb.Entry("other", {}, card, items)]
    assert "figure-robustness" in lb.robustness_figure(entries)
    md = lb.robustness_markdown(entries)
    assert "| tiny-null | 30 |" in md and "not measured for other" in md
    assert lb.robustness_figure(entries[1:]) == {} and lb.robustness_markdown(entries[1:]) == ""


def test_a_file_someone_else_wrote_is_not_replaced(tmp_path):
    row, rob, _, _ = _row_file(tmp_path)
    (row / rb.FILE_NAME).write_text("{}")
    with pytest.raises(EtbenchError, match="was not written by `etbench robustness`"):
        rb.check_outputs(row)
    with pytest.raises(EtbenchError, match="was not written by `etbench robustness`"):
        rb.write(rob, row)
    assert (row / rb.FILE_NAME).read_text() == "{}"


def test_submit_check_refuses_a_forged_file_beside_the_scorecard(tmp_path):
    from etbench.publish import submissions

    row, rob, card, items = _row_file(tmp_path)
    text = (ROOT / "submissions" / "tiny-null.yaml").read_text()
    sub_file = tmp_path / "submissions" / "tiny-null.yaml"
    sub_file.write_text(text)
    rb.write(rob, row)
    parsed = submissions.parse(sub_file)
    assert rb.canonical_bytes(submissions.check_robustness(parsed, row / "scorecard.json", card)) == \
        rb.canonical_bytes(rob)
    forged = json.loads((row / rb.FILE_NAME).read_text())
    forged["summary"]["accuracy"][0]["accuracy"]["value"] = 0.99
    (row / rb.FILE_NAME).write_text(json.dumps(forged))
    with pytest.raises(EtbenchError, match=r"tiny-null.yaml: .*summary\.accuracy\.0\.accuracy\.value"):
        submissions.validate(sub_file)


def test_submit_publishes_the_submitted_rows_robustness(tmp_path):
    """The board ``submit`` writes shows the submitted row's own robustness line (it was rendered from the entry
    without it, so the line appeared only at the next ``leaderboard build``)."""
    from etbench.publish import submissions

    row, rob, _, _ = _row_file(tmp_path)
    (tmp_path / "submissions" / "tiny-null.yaml").write_text((ROOT / "submissions" / "tiny-null.yaml").read_text())
    staged = tmp_path / "submissions" / "staged"  # the card to submit, beside the store (submit writes the entry)
    shutil.copytree(row, staged)
    shutil.rmtree(row)
    rb.write(rob, staged)
    text = (tmp_path / "submissions" / "tiny-null.yaml").read_text().replace(
        "results/tiny-null/scorecard.json", "staged/scorecard.json")
    (tmp_path / "submissions" / "tiny-null.yaml").write_text(text)
    submissions.submit(tmp_path / "submissions" / "tiny-null.yaml", root=tmp_path)
    assert (row / rb.FILE_NAME).read_bytes() == rb.canonical_bytes(rob)
    board = (tmp_path / "leaderboards" / "leaderboard.md").read_text()
    assert "| tiny-null | 30 |" in board and "not measured for tiny-null" not in board
    rebuilt = tmp_path / "rebuilt"
    lb.build(tmp_path, out_dir=rebuilt)
    assert (rebuilt / "leaderboard.md").read_text() == board


def test_a_robustness_file_submit_stored_is_one_etbench_robustness_may_replace(tmp_path):
    """Review: ``etbench robustness ROW`` refused tiny-ft, tiny-goat, tiny-vicuna and tiny-harmful: ``submit``
    replaces a store entry as a whole and stored robustness.json without the manifest ``etbench robustness`` had
    written there, so the row's file read as someone else's. Now ``submit`` stores the manifest with it (before
    and after a re-submit of the row), while a robustness.json nobody of etbench wrote stays refused."""
    from etbench.publish import submissions

    row, rob, _, _ = _row_file(tmp_path)
    sub_file = tmp_path / "submissions" / "tiny-null.yaml"
    sub_file.write_text((ROOT / "submissions" / "tiny-null.yaml").read_text())
    rb.write(rob, row)  # as `etbench robustness` writes it beside the card that is submitted
    (row / rb.ROBUSTNESS_WRITER.manifest).unlink()  # as the store had it: a file submit stored, no manifest
    with pytest.raises(EtbenchError, match="was not written by `etbench robustness`"):
        rb.check_outputs(row)
    submissions.submit(sub_file, root=tmp_path, replace=True)  # the entry's own card (results/tiny-null)
    assert {p.name for p in row.iterdir()} == {"scorecard.json", "items.jsonl", "submission.json", rb.FILE_NAME,
                                               rb.ROBUSTNESS_WRITER.manifest}
    rb.check_outputs(row)
    assert rb.write(rob, row).read_bytes() == rb.canonical_bytes(rob)
    submissions.submit(sub_file, root=tmp_path, replace=True)
    rb.check_outputs(row)


def test_every_committed_robustness_file_is_one_etbench_robustness_may_replace():
    """The committed rows stored by ``submit`` before it kept the manifest got the one it now writes."""
    rows = sorted(p.parent for p in (ROOT / "submissions" / "results").glob(f"*/{rb.FILE_NAME}"))
    assert {"tiny-ft", "tiny-goat", "tiny-vicuna", "tiny-harmful"} <= {row.name for row in rows}
    for row in rows:
        rb.check_outputs(row)
        assert (row / rb.ROBUSTNESS_WRITER.manifest).read_bytes() == \
            rb.stored_files(rb.load(row / rb.FILE_NAME))[rb.ROBUSTNESS_WRITER.manifest]


def test_the_committed_planted_row_shows_its_known_answers():
    """tiny-planted-a was trained on the paper's template with tiny-base's value fetchers mean-ablated: it loses
    accuracy on both held-out wordings (§14 measured -0.13 and -0.15) yet keeps most of its gain, and its W_Q
    change is exactly zero on the base circuit's value fetchers (no gradient reached them, §15)."""
    path = ROOT / "submissions" / "results" / "tiny-planted-a" / "scorecard.json"
    card = sc.load(path)
    rob = rb.load_checked(path, card, sc.load_items(path, card))
    s = rob.summary
    for w in ("stored", "bin"):
        loss = s.pick_accuracy(w, "ft").vs_paper
        assert loss.high < 0 and s.pick_accuracy(w, "ft").vs_paper_p < 0.05
        assert next(g.gain for g in s.gain if g.wording == w).low > 0
    a = next(g for g in s.groups if g.group == "value_fetcher")
    assert a.weight_delta["q"].value == 0 and a.weight_rank["q"].value == 0
    assert all(g.weight_rank["q"].value > 0 for g in s.groups if g.group == "other")


@pytest.mark.parametrize("option", ["n", "mean_n", "diff_n"])
def test_an_explicit_zero_size_is_refused_not_replaced_by_the_default(tmp_path, option):
    """`etbench robustness --n 0` used to run with the default n (``n or DEFAULT_N``); found by review."""
    from etbench import api

    with pytest.raises(EtbenchError, match="--" + option.replace("_", "-")):
        api.robustness([tmp_path / "no-such-row"], store=tmp_path, **{option: 0})
