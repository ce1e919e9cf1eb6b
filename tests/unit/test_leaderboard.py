"""etbench leaderboard build: deterministic files, paper rows marked, Holm across submissions (synthetic fixtures)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from etbench.publish import leaderboard as lb

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scorecards"


def make_store(root: Path, names=("synthetic-ft-a", "synthetic-ft-b")) -> Path:
    """Put fixture scorecards where `etbench submit` would have stored them."""
    for name in names:
        target = root / "submissions" / "results" / name
        shutil.copytree(FIXTURES / name, target)
        meta = {"name": name, "model_ref": f"synthetic/{name}", "base_ref": "synthetic/synthetic-base",
                "fine_tuning": {"data": "synthetic", "method": "lora"}, "license": "MIT",
                "contact": "tests@example.invalid"}
        (target / "submission.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = make_store(tmp_path_factory.mktemp("lb"))
    lb.build(root)
    return root


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_build_writes_all_formats_and_rebuild_is_byte_identical(built):
    out = built / "leaderboards"
    first = _tree(out)
    assert set(first) == {"leaderboard.csv", "leaderboard.json", "leaderboard.md", "index.html",
                          "reports/synthetic-ft-a.md", "reports/synthetic-ft-a.html",
                          "reports/synthetic-ft-b.md", "reports/synthetic-ft-b.html"}
    lb.build(built)
    assert _tree(out) == first


def test_rows_measured_first_paper_rows_marked(built):
    data = json.loads((built / "leaderboards" / "leaderboard.json").read_text())
    rows = data["rows"]
    assert [r["name"] for r in rows[:2]] == ["synthetic-ft-a", "synthetic-ft-b"]  # measured, by accuracy
    paper = {r["name"]: r for r in rows if r["origin"] == "paper"}
    assert set(paper) == {"Llama-7B", "Vicuna-7B", "Goat-7B", "FLoat-7B"}
    assert all(r["note"] == lb.PAPER_NOTE for r in paper.values())
    assert [paper[m]["accuracy"]["value"] for m in ("Llama-7B", "Vicuna-7B", "Goat-7B", "FLoat-7B")] == \
        [0.66, 0.67, 0.82, 0.82]
    assert [paper[m]["faithfulness"]["value"] for m in ("Llama-7B", "Vicuna-7B", "Goat-7B", "FLoat-7B")] == \
        [1.0, 0.97, 0.89, 0.88]
    assert paper["Goat-7B"]["cmap_gain"]["value"] == pytest.approx(0.82 - 0.66)
    assert paper["FLoat-7B"]["cmap_gain"]["value"] == pytest.approx(0.82 - 0.66)
    measured = rows[0]
    assert measured["accuracy"]["low"] < measured["accuracy"]["value"] < measured["accuracy"]["high"]
    assert measured["report"] == "reports/synthetic-ft-a.html"
    # Holm across the two submissions' ft-vs-base McNemar tests
    ps = sorted(r["delta_p"] for r in rows[:2])
    holm = sorted(r["delta_p_holm"] for r in rows[:2])
    assert holm[0] == pytest.approx(min(1.0, 2 * ps[0]))


def test_csv_markdown_html_agree(built):
    out = built / "leaderboards"
    with open(out / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["name"] == "synthetic-ft-a" and rows[0]["accuracy_low"]
    md = (out / "leaderboard.md").read_text()
    assert "reported by the paper, not measured here" in md and md.count("\n| ") == 7
    page = (out / "index.html").read_text()
    assert "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert page.count('<tr class="paper"') == 4 and page.count('<tr class="measured"') == 2


def test_empty_store_gives_paper_rows_only(tmp_path):
    lb.build(tmp_path)
    data = json.loads((tmp_path / "leaderboards" / "leaderboard.json").read_text())
    assert len(data["rows"]) == 4 and all(r["origin"] == "paper" for r in data["rows"])


def test_stale_files_are_removed_and_failures_roll_back(tmp_path, monkeypatch):
    root = make_store(tmp_path, names=("synthetic-ft-a",))
    lb.build(root)
    stale = root / "leaderboards" / "reports" / "gone.html"
    stale.write_text("old")
    lb.build(root)
    assert not stale.exists()
    before = _tree(root / "leaderboards")
    shutil.rmtree(root / "submissions" / "results" / "synthetic-ft-a")  # now the reports must go
    calls = {"n": 0}
    real = lb._write

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated")
        real(path, data)

    monkeypatch.setattr(lb, "_write", flaky)
    with pytest.raises(OSError):
        lb.build(root)
    assert _tree(root / "leaderboards") == before


def test_committed_leaderboard_is_what_build_produces(tmp_path):
    """leaderboards/ in the repository is generated: a fresh build from the stored results matches it."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "leaderboards" / "index.html").is_file():
        pytest.skip("no generated leaderboards/ in this checkout")
    lb.build(repo, out_dir=tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(repo / "leaderboards"), "run `etbench leaderboard build` and commit"
