"""The leaderboard page in a real headless browser (Debian's chromium): it renders every row, sorting
works, and nothing is fetched. Built from synthetic fixture scorecards (not results)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etbench.publish import leaderboard as lb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_leaderboard import make_store  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)",
)

# Appended to a copy of the page: clicks a header twice, records row orders, resource loads and CSP violations.
HARNESS = """<script>
var violations = 0;
document.addEventListener('securitypolicyviolation', function () { violations++; });
window.addEventListener('load', function () {
  var ths = document.querySelectorAll('#leaderboard thead th'), col = -1;
  for (var i = 0; i < ths.length; i++) if (ths[i].textContent.indexOf('Accuracy (7 boxes)') === 0) col = i;
  function order() {
    return Array.prototype.map.call(document.querySelectorAll('#leaderboard tbody tr'), function (r) {
      return [r.getAttribute('data-name'), r.cells[col].getAttribute('data-sort')]; });
  }
  var initial = order();
  ths[col].click(); var asc = order();
  ths[col].click(); var desc = order();
  // every column once, ascending: header -> the column's data-sort values in the order shown
  var everyColumn = {};
  for (var c = 0; c < ths.length; c++) {
    ths[c].click(); if (ths[c].getAttribute('aria-sort') !== 'ascending') ths[c].click();
    everyColumn[ths[c].textContent] = Array.prototype.map.call(
      document.querySelectorAll('#leaderboard tbody tr'), function (r) { return r.cells[c].getAttribute('data-sort'); });
  }
  setTimeout(function () {
    var pre = document.createElement('pre'); pre.id = 'etbench-test';
    pre.textContent = JSON.stringify({initial: initial, asc: asc, desc: desc, violations: violations,
      everyColumn: everyColumn,
      resources: performance.getEntriesByType('resource').length,
      // HTML links and the SVG figures' links (xlink:href) alike
      links: Array.prototype.map.call(document.querySelectorAll('a'), function (a) {
        return a.getAttribute('href') || a.getAttributeNS('http://www.w3.org/1999/xlink', 'href'); }),
      figures: Array.prototype.map.call(document.querySelectorAll('figure'), function (f) {
        var svg = f.querySelector('svg'), box = svg ? svg.getBoundingClientRect() : null;
        return {id: f.id, width: box ? box.width : 0, height: box ? box.height : 0,
                markers: svg ? svg.querySelectorAll('a').length : 0}; }),
      matrix: Array.prototype.map.call(document.querySelectorAll('table.matrix td.pair'), function (td) {
        var a = td.querySelector('a');
        return {a: td.getAttribute('data-a'), b: td.getAttribute('data-b'), status: td.getAttribute('data-status'),
                text: td.textContent, href: a ? a.getAttribute('href') : null,
                visible: td.getBoundingClientRect().width > 0}; })});
    document.body.appendChild(pre);
  }, 200);
});
</script>"""


def run_page(page: Path, tmp: Path) -> dict:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-default-apps",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="etbench-test">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium produced no result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    root = make_store(tmp_path_factory.mktemp("browser"))
    lb.build(root)
    return root / "leaderboards"


def _with_harness(board: Path, extra: str = "") -> Path:
    page = board / "test_page.html"
    page.write_text((board / "index.html").read_text().replace("</body>", extra + HARNESS + "</body>"))
    return page


def _values(rows):
    return [float(v) for _, v in rows if v != ""]


def test_page_renders_all_rows_sorts_and_fetches_nothing(board, tmp_path):
    result = run_page(_with_harness(board), tmp_path)
    names = [n for n, _ in result["initial"]]
    assert set(names) == {"synthetic-ft-a", "synthetic-ft-b", "Llama-7B", "Vicuna-7B", "Goat-7B", "FLoat-7B"}
    asc, desc = _values(result["asc"]), _values(result["desc"])
    assert len(asc) == 6 and asc == sorted(asc) and desc == sorted(desc, reverse=True)
    assert result["resources"] == 0 and result["violations"] == 0
    assert set(result["links"]) == {"reports/synthetic-ft-a.html", "reports/synthetic-ft-b.html",
                                    "reports/compare/synthetic-ft-a__synthetic-ft-b.html"}
    for link in result["links"]:
        assert (board / link).is_file()


def test_page_renders_figures_and_the_comparison_matrix(board, tmp_path):
    result = run_page(_with_harness(board), tmp_path)
    figures = {f["id"]: f for f in result["figures"]}
    assert set(figures) == {"figure-gain-vs-cmap", "figure-overlap-by-group"}
    for f in figures.values():
        assert f["width"] > 100 and f["height"] > 100, f  # drawn, not an empty box
        assert f["markers"] >= 2  # each measured row's marker is a link to its report
    (cell,) = result["matrix"]
    assert (cell["a"], cell["b"], cell["status"]) == ("synthetic-ft-a", "synthetic-ft-b", "compared")
    assert cell["visible"] and "Δacc" in cell["text"] and "Holm" in cell["text"]
    assert (board / cell["href"]).is_file()
    assert (board / cell["href"]).read_text().count("accuracy, 7 boxes") == 1


def test_every_metric_column_sorts(board, tmp_path):
    result = run_page(_with_harness(board), tmp_path)
    metric_headers = [h for k, h, kind in lb.COLUMNS if kind in ("est", "p")]
    assert set(metric_headers) <= set(result["everyColumn"])
    for header in metric_headers:
        shown = result["everyColumn"][header]
        values = [float(v) for v in shown if v != ""]
        assert values == sorted(values), header
        assert shown[:len(values)] == [v for v in shown if v != ""], header  # rows without a value last
    gains = [float(v) for v in result["everyColumn"]["Accuracy gain (ft − base)"] if v != ""]
    assert len(gains) == 6  # both measured rows and the four paper rows


def test_harness_detects_a_network_request(board, tmp_path):
    """Control: a page that does try to fetch something is caught (CSP blocks it and reports it)."""
    result = run_page(_with_harness(board, '<img src="http://example.invalid/x.png">'), tmp_path)
    assert result["violations"] >= 1


def test_report_page_renders_figures(board, tmp_path):
    report = board / "reports" / "synthetic-ft-a.html"
    page = tmp_path / "r.html"
    probe = ("<script>window.addEventListener('load',function(){var p=document.createElement('pre');"
             "p.id='etbench-test';p.textContent=JSON.stringify({svgs:document.querySelectorAll('svg').length,"
             "resources:performance.getEntriesByType('resource').length});document.body.appendChild(p);});</script>")
    # the report's CSP has no script-src; the probe copy relaxes only that, to count what rendered
    text = report.read_text().replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    page.write_text(text.replace("</body>", probe + "</body>"))
    result = run_page(page, tmp_path)
    assert result["svgs"] == 3 and result["resources"] == 0
