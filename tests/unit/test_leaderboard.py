"""etbench leaderboard build: deterministic files, paper rows marked, Holm across submissions (synthetic fixtures)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from etbench.core.io import temporary_name
from etbench.publish import leaderboard as lb
from etbench.publish import outputs

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
    assert set(first) == {"leaderboard.csv", "leaderboard.json", "leaderboard.md", "index.html", "comparisons.json",
                          "reports/synthetic-ft-a.md", "reports/synthetic-ft-a.html",
                          "reports/synthetic-ft-b.md", "reports/synthetic-ft-b.html",
                          "reports/compare/synthetic-ft-a__synthetic-ft-b.md",
                          "reports/compare/synthetic-ft-a__synthetic-ft-b.html", outputs.MANIFEST_NAME}
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
    assert [(r["group"], r["rank"]) for r in rows[:2]] == [("synthetic/synthetic-base", "1"),
                                                          ("synthetic/synthetic-base", "2")]
    assert all(r["reuse_low"] and r["protocol"] for r in rows[:2])
    md = (out / "leaderboard.md").read_text()
    assert "reported by the paper, not measured here" in md
    # one table per base (a header line and one line per row), the measured base first, the paper's last
    sections = md.split("\n## ")
    assert sections[1].startswith("synthetic/synthetic-base\n") and sections[1].count("\n| ") == 3
    assert sections[2].startswith("Llama-7B (reported by the paper") and sections[2].count("\n| ") == 5
    page = (out / "index.html").read_text()
    assert "default-src 'none'" in page
    assert not re.search(r"""src\s*=\s*["']?\s*(https?:)?//""", page, re.I) and "<link" not in page
    # the one address outside the page's tree is the paper's, a link a reader follows, never fetched
    assert set(re.findall(r"""href\s*=\s*["']?\s*((?:https?:)?//[^"' >]*)""", page, re.I)) == {lb.PAPER_URL}
    assert page.count('<tr class="paper"') == 4 and page.count('<tr class="measured"') == 2
    assert page.count('<table class="board"') == 2  # one per base


def test_rows_are_grouped_by_base_and_ranked_by_accuracy_change(built):
    rows = json.loads((built / "leaderboards" / "leaderboard.json").read_text())["rows"]
    for group in {r["group"] for r in rows}:
        members = [r for r in rows if r["group"] == group]
        assert [r["rank"] for r in members] == list(range(1, len(members) + 1))
        gains = [r["accuracy_gain"]["value"] for r in members]
        assert gains == sorted(gains, reverse=True), (group, gains)
    measured = [r for r in rows if r["origin"] == "measured"]
    assert all(r["reuse"]["low"] < r["reuse"]["high"] and r["verdict"] for r in measured)


def test_empty_store_gives_paper_rows_only(tmp_path):
    lb.build(tmp_path)
    data = json.loads((tmp_path / "leaderboards" / "leaderboard.json").read_text())
    assert len(data["rows"]) == 4 and all(r["origin"] == "paper" for r in data["rows"])


def test_build_into_a_users_directory_leaves_their_temporary_looking_files(tmp_path):
    """A killed build's temporaries are cleaned up, but only its own: in an --out the user named, a file of
    theirs named like a temporary (``.notes.<12 hex>.bak``) is not etbench's to delete (found by review)."""
    root = make_store(tmp_path / "store", names=("synthetic-ft-a",))
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    users = [out / ".notes.0123456789ab.bak", out / "sub" / ".draft.aaaaaaaaaaaa.tmp"]
    for path in users:
        path.write_text("the user's")
    lb.build(root, out_dir=out)
    stale = temporary_name(out / "leaderboard.csv")  # as a build killed mid-write leaves it
    stale.write_text("half")
    lb.build(root, out_dir=out)
    assert all(p.read_text() == "the user's" for p in users)
    assert not stale.exists()


def test_stale_files_are_removed_and_failures_roll_back(tmp_path, monkeypatch):
    root = make_store(tmp_path, names=("synthetic-ft-a",))
    lb.build(root)
    mine = root / "leaderboards" / "reports" / "gone.html"  # not generated by a build: never deleted (#14)
    mine.write_text("old")
    lb.build(root)
    assert mine.read_text() == "old"
    before = _tree(root / "leaderboards")
    shutil.rmtree(root / "submissions" / "results" / "synthetic-ft-a")  # now the reports must go
    calls = {"n": 0}
    real = outputs._write

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated")
        real(path, data)

    monkeypatch.setattr(outputs, "_write", flaky)
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


def _hrefs(page: str) -> list[str]:
    """Targets of the page's links, HTML and SVG (not the SVG's own ``<use xlink:href="#...">``)."""
    return re.findall(r'<a [^>]*?(?:xlink:)?href="([^"]+)"', page)


def test_every_link_of_the_page_resolves_and_measured_numbers_link_to_their_report(built):
    out = built / "leaderboards"
    page = (out / "index.html").read_text()
    links = _hrefs(page)
    repo = Path(__file__).resolve().parents[2]
    outside = {link for link in links if link.startswith("https://")}
    assert outside == {lb.PAPER_URL}  # a link, never a fetch: the only address outside the page's tree
    for link in set(links) - outside:
        path, _, anchor = link.partition("#")
        if not path:
            assert f'id="{anchor}"' in page, link
        elif path.startswith("../"):  # the method doc and the submission guide, in the repository
            assert (repo / path.removeprefix("../")).is_file(), link
        else:
            assert (out / path).is_file(), link
    assert lb.METHOD_DOC in {link.partition("#")[0] for link in links} and lb.SUBMIT_DOC in links
    assert "reports/compare/synthetic-ft-a__synthetic-ft-b.html" in links
    for name in ("synthetic-ft-a", "synthetic-ft-b"):
        row = re.search(rf'<tr class="measured" data-name="{name}"[^>]*>(.*?)</tr>', page).group(1)
        cells = re.findall(r'<td[^>]* class="(?:est|p)[^"]*"[^>]*>(.*?)</td>', row)
        assert len(cells) == sum(kind in ("est", "p") for _, _, kind in lb.COLUMNS)
        numbers = [td for td in cells if td != "—"]  # an undefined figure has nothing to link
        assert len(numbers) >= 8 and all(re.search(r"\d\.\d", td) for td in numbers) and all(f'<a href="reports/{name}.html">' in td for td in numbers), numbers


def test_page_has_figures_and_matrix(built):
    out = built / "leaderboards"
    page = (out / "index.html").read_text()
    figures = re.findall(r'<figure id="([^"]+)"><svg', page)
    assert figures == ["figure-gain-vs-cmap", "figure-overlap-by-group"]
    gain = page[page.index('<figure id="figure-gain-vs-cmap">'):page.index('<figure id="figure-overlap-by-group">')]
    # both measured rows are drawn and linked; the paper's Goat/FLoat points are labelled as reported
    assert gain.count('xlink:href="reports/synthetic-ft-a.html"') >= 1 and "FLoat-7B (reported)" in gain
    assert page.count('<td class="pair') == 1 and 'data-a="synthetic-ft-a" data-b="synthetic-ft-b"' in page
    data = json.loads((out / "comparisons.json").read_text())
    (group,) = data["groups"]
    assert group["members"] == ["synthetic-ft-a", "synthetic-ft-b"] and data["alone_on_their_base"] == []
    (cell,) = group["pairs"]
    assert cell["status"] == "compared" and (out / cell["report"]).is_file()
    # the fixtures' planted accuracies (0.75 vs 0.6 on the same 120 items) show as a significant cell
    assert cell["accuracy"]["difference"] < 0 and cell["accuracy"]["p_adjusted"] < 0.05
    assert 'class="pair significant"' in page
    acc = json.loads((out / "leaderboard.json").read_text())["rows"]
    by_name = {r["name"]: r for r in acc}
    # the matrix's difference is the two rows' 7-box accuracies apart, on the same 120 items
    assert cell["accuracy"]["difference"] == pytest.approx(by_name["synthetic-ft-b"]["accuracy"]["value"]
                                                           - by_name["synthetic-ft-a"]["accuracy"]["value"])
    assert "| synthetic-ft-b | " in (out / "leaderboard.md").read_text()


def test_a_row_alone_on_its_base_gets_no_matrix(tmp_path):
    root = make_store(tmp_path, names=("synthetic-ft-a",))
    lb.build(root)
    out = root / "leaderboards"
    data = json.loads((out / "comparisons.json").read_text())
    assert data["groups"] == [] and data["alone_on_their_base"] == ["synthetic-ft-a"]
    assert 'class="matrix"' not in (out / "index.html").read_text() and not (out / "reports" / "compare").exists()
