"""The leaderboard: regenerated from stored scorecards, never edited by hand.

``submissions/results/<name>/`` holds what ``etbench submit`` ingested (``scorecard.json``, its items
file and ``submission.json``). ``build`` turns them, plus the paper's published figures
(``assets/paper_results.json``, marked as reported by the paper), into ``leaderboards/``:
``leaderboard.csv``, ``leaderboard.json``, ``leaderboard.md``, a self-contained ``index.html``
(inline CSS/JS, sortable, no network requests) and one report per submission under ``reports/``.

Output is a pure function of the inputs (no timestamps, sorted rows, canonical JSON), so a rebuild
is byte-identical. Writes go through ``Transaction``: on any error every file is put back.
"""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from etbench.core import stats
from etbench.core.errors import EtbenchError
from etbench.core.io import ASSETS_DIR, atomic_write_bytes, dumps_json
from etbench.core.stats import format_estimate, format_p
from etbench.publish import report
from etbench.publish.page import BASE_CSS, content_security_policy
from etbench.schema import scorecard as sc

PAPER_RESULTS = ASSETS_DIR / "paper_results.json"
RESULTS_SUBDIR = Path("submissions") / "results"
LEADERBOARD_DIR = Path("leaderboards")
PAPER_NOTE = "reported by the paper, not measured here"
MEASURED_NOTE = "measured here (etbench scorecard)"


# ---------------------------------------------------------------------------------------------
# All-or-nothing writes
# ---------------------------------------------------------------------------------------------

def _write(path: Path, data: bytes) -> None:
    """The one place files are written (tests monkeypatch it to simulate an interrupted write)."""
    atomic_write_bytes(path, data)


class Transaction:
    """Write/delete files; on an exception inside ``with`` every touched path is restored.

    Each file is replaced atomically, and the previous bytes (or absence) of every path are kept
    in memory so a failure midway leaves the tree byte-for-byte as it was.
    """

    def __init__(self) -> None:
        self._saved: dict[Path, Optional[bytes]] = {}
        self._created_dirs: list[Path] = []

    def _remember(self, path: Path) -> None:
        if path not in self._saved:
            self._saved[path] = path.read_bytes() if path.is_file() else None
            missing, parent = [], path.parent
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            self._created_dirs.extend(reversed(missing))

    def write(self, path: Path, data: bytes) -> None:
        path = Path(path)
        self._remember(path)
        if self._saved[path] == data:
            return
        _write(path, data)

    def delete(self, path: Path) -> None:
        path = Path(path)
        self._remember(path)
        if path.exists():
            path.unlink()

    def rollback(self) -> None:
        for path, old in self._saved.items():
            try:
                if old is None:
                    if path.exists():
                        path.unlink()
                elif not path.is_file() or path.read_bytes() != old:
                    atomic_write_bytes(path, old)
            except OSError:
                pass
        for directory in sorted(self._created_dirs, key=lambda p: len(p.parts), reverse=True):
            try:
                directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False


# ---------------------------------------------------------------------------------------------
# Stored results
# ---------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One ingested submission: its metadata, scorecard and per-item rows."""

    name: str
    submission: dict[str, Any]
    card: sc.Scorecard
    items: list[dict[str, Any]]


def load_entry(directory: Path) -> Entry:
    directory = Path(directory)
    card_path = directory / "scorecard.json"
    card = sc.load(card_path)
    try:
        meta = json.loads((directory / "submission.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise EtbenchError(f"{directory}: unreadable submission.json ({err})") from None
    items_path = directory / card.items_file
    items = sc.load_items(card_path, card) if items_path.is_file() else []
    return Entry(meta.get("name", directory.name), meta, card, items)


def load_entries(results_dir: Path, exclude: tuple[str, ...] = ()) -> list[Entry]:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    return [load_entry(d) for d in sorted(results_dir.iterdir())
            if d.is_dir() and not d.name.startswith(".") and d.name not in exclude]


def paper_results() -> dict[str, Any]:
    return json.loads(PAPER_RESULTS.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------

def _est(e: Optional[sc.Estimate]) -> dict[str, Any]:
    if e is None:
        return {"value": None, "low": None, "high": None, "n": None, "method": None}
    return {"value": e.value, "low": e.low, "high": e.high, "n": e.n, "method": e.method}


def _num(value: Optional[float]) -> dict[str, Any]:
    return {"value": value, "low": None, "high": None, "n": None, "method": None if value is None else "reported"}


def pick_accuracy(card: sc.Scorecard, model: str, n_boxes: int = 7) -> Optional[sc.Estimate]:
    return next((a.accuracy for a in card.accuracy if a.model == model and a.n_boxes == n_boxes), None)


def pick_faithfulness(card: sc.Scorecard, circuit: str = "base", model: str = "ft") -> Optional[sc.FaithfulnessScore]:
    return next((f for f in card.faithfulness if f.circuit == circuit and f.model == model), None)


def pick_overlap(card: sc.Scorecard, heads: str = "circuit", group: str = "all") -> Optional[sc.OverlapScore]:
    return next((o for o in card.overlap if o.heads == heads and o.group == group), None)


def pick_cmap(card: sc.Scorecard, group: str = "full", variant: str = "output") -> Optional[sc.CmapScore]:
    return next((c for c in card.cmap if c.group == group and c.variant == variant), None)


COLUMNS = (  # key, header, kind
    ("name", "Model", "text"),
    ("origin", "Source", "text"),
    ("base", "Base", "text"),
    ("method", "Fine-tuning", "text"),
    ("accuracy", "Accuracy (7 boxes)", "est"),
    ("base_accuracy", "Base accuracy", "est"),
    ("faithfulness", "Faithfulness of base circuit on ft", "est"),
    ("head_overlap", "Head overlap (base circuit in ft)", "est"),
    ("cmap_gain", "CMAP gain (full circuit)", "est"),
    ("delta_p_holm", "Δacc McNemar p (Holm)", "p"),
)


def entry_row(entry: Entry) -> dict[str, Any]:
    card = entry.card
    faith = pick_faithfulness(card)
    overlap = pick_overlap(card)
    cmap = pick_cmap(card)
    return {
        "name": entry.name,
        "origin": "measured",
        "note": MEASURED_NOTE,
        "base": entry.submission.get("base_ref", card.base.ref),
        "model_ref": entry.submission.get("model_ref", card.ft.ref),
        "method": entry.submission.get("fine_tuning", {}).get("method", ""),
        "accuracy": _est(pick_accuracy(card, "ft")),
        "base_accuracy": _est(pick_accuracy(card, "base")),
        "faithfulness": _est(faith.faithfulness if faith else None),
        "head_overlap": _est(overlap.base_in_ft if overlap else None),
        "cmap_gain": _est(cmap.gain if cmap else None),
        "report": f"reports/{entry.name}.html",
        "config_hash": card.config_hash,
        "benchmark_version": card.provenance.benchmark_version,
        "delta_p": None,
        "delta_p_holm": None,
    }


def paper_rows() -> list[dict[str, Any]]:
    data = paper_results()
    base_acc = data["base_accuracy"]
    rows = []
    for r in data["rows"]:
        gain = None if r.get("cmap_full") is None else round(r["cmap_full"] - base_acc[r["base"]], 4)
        rows.append({
            "name": r["name"],
            "origin": "paper",
            "note": PAPER_NOTE,
            "base": r["base"],
            "model_ref": r["name"],
            "method": r["fine_tuning"],
            "accuracy": _num(r["accuracy"]),
            "base_accuracy": _num(base_acc[r["base"]]),
            "faithfulness": _num(r["faithfulness"]),
            "head_overlap": _num(r.get("head_overlap_circuit")),
            "cmap_gain": _num(gain),
            "report": None,
            "config_hash": None,
            "benchmark_version": None,
            "delta_p": None,
            "delta_p_holm": None,
        })
    return rows


def _sort_key(row: dict[str, Any]):
    acc = row["accuracy"]["value"]
    return (row["origin"] != "measured", -(acc if acc is not None else -1.0), row["name"])


def rows_for(entries: list[Entry], include_paper: bool = True) -> list[dict[str, Any]]:
    """All rows, with the ft-vs-base accuracy McNemar p-values Holm-corrected across submissions."""
    rows = [entry_row(e) for e in entries]
    ps = []
    for row, entry in zip(rows, entries):
        test = report.accuracy_tests(entry.card, entry.items, n_boxes=(7,))
        row["delta_p"] = test[0].p_value if test else None
        ps.append(row["delta_p"])
    present = [p for p in ps if p is not None]
    adjusted = iter(stats.adjust_pvalues(present, "holm").adjusted)
    for row in rows:
        if row["delta_p"] is not None:
            row["delta_p_holm"] = next(adjusted)
    if include_paper:
        rows += paper_rows()
    return sorted(rows, key=_sort_key)


# ---------------------------------------------------------------------------------------------
# Rendering (pure: same inputs, same bytes)
# ---------------------------------------------------------------------------------------------

def fmt(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def fmt_est(e: dict[str, Any]) -> str:
    # the paper reported 2 decimals: its numbers are shown as reported, not padded to 3
    return format_estimate(e["value"], e["low"], e["high"], digits=2 if e.get("method") == "reported" else 3)


def _cell_text(row: dict[str, Any], key: str, kind: str) -> str:
    if kind == "est":
        return fmt_est(row[key])
    if kind == "p":
        return format_p(row[key])
    if key == "origin" and row[key] == "paper":
        return "paper (reported, not measured here)"
    return str(row[key])


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    header = ["name", "origin", "note", "base", "model_ref", "method"]
    for key, _, kind in COLUMNS:
        if kind == "est":
            header += [key, f"{key}_low", f"{key}_high", f"{key}_n"]
    header += ["delta_p", "delta_p_holm", "config_hash", "benchmark_version", "report"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        out = [row[k] for k in ("name", "origin", "note", "base", "model_ref", "method")]
        for key, _, kind in COLUMNS:
            if kind == "est":
                e = row[key]
                out += [e["value"], e["low"], e["high"], e["n"]]
        out += [row["delta_p"], row["delta_p_holm"], row["config_hash"], row["benchmark_version"], row["report"]]
        writer.writerow(["" if v is None else v for v in out])
    return buf.getvalue()


def render_json(rows: list[dict[str, Any]]) -> str:
    return dumps_json({
        "benchmark_version": sc.BENCHMARK_VERSION,
        "paper": paper_results()["paper"],
        "paper_note": PAPER_NOTE,
        "columns": [{"key": k, "header": h} for k, h, _ in COLUMNS],
        "rows": rows,
    })


def render_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# etbench leaderboard",
        "",
        f"Benchmark version {sc.BENCHMARK_VERSION}. Generated by `etbench leaderboard build` from "
        "`submissions/results/`; do not edit. Values are estimates with 95% CIs in brackets.",
        f"Rows marked *paper* are **{PAPER_NOTE}** (their head overlap is derived from the paper's published "
        "circuit files). CMAP gain = accuracy of the base model with the fine-tuned model's circuit activations "
        "patched in, minus the base model's accuracy.",
        "",
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " | Report |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [_cell_text(row, k, kind).replace("|", "\\|") for k, _, kind in COLUMNS]
        cells.append(f"[report]({row['report'].removesuffix('.html')}.md)" if row["report"] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


CSP = content_security_policy(scripts=True)

_STYLE = BASE_CSS + """
th{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr.paper td{background:#fff8e6;font-style:italic}
.ci{color:#666;font-size:12px}
.note{color:#8a5a00}
"""

_SCRIPT = """
(function(){
  var table=document.getElementById('leaderboard');
  var ths=table.tHead.rows[0].cells;
  function key(td){var v=td.getAttribute('data-sort');var f=parseFloat(v);
    return (v===''||v===null)?null:(isNaN(f)?v.toLowerCase():f);}
  function sortBy(i,dir){
    var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
      if(x===null&&y===null)return 0;if(x===null)return 1;if(y===null)return -1;
      if(x<y)return -dir;if(x>y)return dir;return 0;});
    rows.forEach(function(r){body.appendChild(r);});
    for(var j=0;j<ths.length;j++)ths[j].removeAttribute('aria-sort');
    ths[i].setAttribute('aria-sort',dir>0?'ascending':'descending');
  }
  for(var i=0;i<ths.length;i++)(function(i){ths[i].addEventListener('click',function(){
    sortBy(i,ths[i].getAttribute('aria-sort')==='ascending'?-1:1);});})(i);
  window.etbenchSort=sortBy;
})();
"""


def _sort_value(row: dict[str, Any], key: str, kind: str) -> str:
    if kind == "est":
        v = row[key]["value"]
        return "" if v is None else repr(float(v))
    if kind == "p":
        return "" if row[key] is None else repr(float(row[key]))
    return str(row[key])


def render_html(rows: list[dict[str, Any]]) -> str:
    esc = html.escape
    head = "".join(f'<th scope="col">{esc(h)}</th>' for _, h, _ in COLUMNS) + "<th>Report</th>"
    body = []
    for row in rows:
        cells = []
        for key, _, kind in COLUMNS:
            text = _cell_text(row, key, kind)
            if kind == "est" and row[key]["low"] is not None and row[key]["value"] is not None:
                text = (f'{row[key]["value"]:.3f} <span class="ci">[{row[key]["low"]:.3f}, '
                        f'{row[key]["high"]:.3f}]</span>')
            else:
                text = esc(text)
            if key == "origin":
                text = ('<span class="note">paper: not measured here</span>' if row["origin"] == "paper"
                        else "measured")
            cells.append(f'<td data-sort="{esc(_sort_value(row, key, kind))}">{text}</td>')
        link = (f'<a href="{esc(row["report"])}">report</a>' if row["report"] else "—")
        cells.append(f'<td data-sort="">{link}</td>')
        cls = "paper" if row["origin"] == "paper" else "measured"
        body.append(f'<tr class="{cls}" data-name="{esc(row["name"])}">' + "".join(cells) + "</tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>etbench leaderboard</title>
<style>{_STYLE}</style></head>
<body>
<h1>etbench leaderboard</h1>
<p>Benchmark version {esc(sc.BENCHMARK_VERSION)}. Entity tracking (Prakash et al., ICLR 2024): how fine-tuning
changes a model's entity-tracking mechanism. Values are estimates with 95% CIs in brackets. Click a column
header to sort.</p>
<p class="note">Italic rows are <strong>{esc(PAPER_NOTE)}</strong> (head overlap derived from the paper's
published circuit files).</p>
<table id="leaderboard"><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""


def render(entries: list[Entry], include_paper: bool = True) -> dict[str, bytes]:
    """Every file of ``leaderboards/``, keyed by relative path."""
    rows = rows_for(entries, include_paper)
    files = {
        "leaderboard.csv": render_csv(rows),
        "leaderboard.json": render_json(rows),
        "leaderboard.md": render_markdown(rows),
        "index.html": render_html(rows),
    }
    for entry in entries:
        doc = report.scorecard_report(entry.card, entry.items, title=entry.name, submission=entry.submission)
        files[f"reports/{entry.name}.md"] = doc.markdown
        files[f"reports/{entry.name}.html"] = doc.html
    return {k: v.encode("utf-8") for k, v in sorted(files.items())}


def write_tree(out_dir: Path, files: dict[str, bytes], txn: Transaction) -> list[Path]:
    """Make ``out_dir`` hold exactly ``files`` (stale generated files are removed)."""
    out_dir = Path(out_dir)
    written = []
    for rel, data in files.items():
        path = out_dir / rel
        txn.write(path, data)
        written.append(path)
    if out_dir.is_dir():
        keep = {out_dir / rel for rel in files}
        for path in sorted(out_dir.rglob("*")):
            if path.is_file() and path not in keep and not path.name.startswith("."):
                txn.delete(path)
    return written


def build(root: Path = Path("."), out_dir: Optional[Path] = None, include_paper: bool = True) -> list[Path]:
    """Regenerate ``leaderboards/`` from ``submissions/results/`` under ``root``."""
    root = Path(root)
    out_dir = root / LEADERBOARD_DIR if out_dir is None else Path(out_dir)
    entries = load_entries(root / RESULTS_SUBDIR)
    files = render(entries, include_paper)
    with Transaction() as txn:
        return write_tree(out_dir, files, txn)
