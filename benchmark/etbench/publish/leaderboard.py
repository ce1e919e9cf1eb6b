"""The leaderboard: regenerated from stored scorecards, never edited by hand.

``submissions/results/<name>/`` holds what ``etbench submit`` ingested (``scorecard.json``, its items
file and ``submission.json``). ``build`` turns them, plus the paper's published figures
(``assets/paper_results.json``, marked as reported by the paper), into ``leaderboards/``:
``leaderboard.csv``, ``leaderboard.json``, ``leaderboard.md``, a self-contained ``index.html``
(inline CSS/JS: one sortable table per base, a text filter and a compact view; no network requests; inline
SVG figures), one report per submission
under ``reports/``, and the pairwise comparisons among fine-tunes of one base (``comparisons.json``, a
matrix on the page and in the Markdown, one comparison report per pair under ``reports/compare/``).

Rows are grouped by base (the paper's rows in a group of their own, reported, not measured) and ranked within
their group by Δaccuracy; each measured row carries the headline scores of ``etbench.metrics.headline``
(mechanism reuse, gain explained) with their CIs, and its protocol, benchmark version and submission date.

Output is a pure function of the inputs (no timestamps, sorted rows, canonical JSON), so a rebuild
is byte-identical. Writes go through ``outputs.Transaction``: on any error every file is put back; the
build's manifest (``outputs.write_tree``) lists its files, the only ones a later build replaces or deletes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from etbench.core import stats
from etbench.core.errors import EtbenchError
from etbench.core.io import (
    ASSETS_DIR,
    FileLock,
    check_output_dir,
    dumps_json,
    read_json,
    remove_stale_temporaries,
)
from etbench.core.stats import format_estimate, format_estimate_of, format_p
from etbench.metrics import headline, robustness
from etbench.metrics.overlap import ALL, chance_overlap, group_overlaps
from etbench.publish import comparisons, report
from etbench.publish.outputs import Transaction, remove_own_temporaries, write_tree
from etbench.publish.page import BASE_CSS, content_security_policy
from etbench.schema import scorecard as sc
from etbench.schema.circuit import GROUPS, PAPER_CIRCUITS, paper_circuit

PAPER_RESULTS = ASSETS_DIR / "paper_results.json"
RESULTS_SUBDIR = Path("submissions") / "results"
LEADERBOARD_DIR = Path("leaderboards")
LOCK_NAME = ".etbench.lock"
PAPER_NOTE = "reported by the paper, not measured here"
MEASURED_NOTE = "measured here (etbench scorecard)"


def store_lock(root: Path) -> FileLock:
    """The lock every writer of ``ROOT/submissions/results`` and its leaderboard holds while it reads,
    renders and writes (``etbench submit`` and ``leaderboard build`` in several processes)."""
    return FileLock(Path(root) / "submissions" / LOCK_NAME)


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
    robustness: Optional[robustness.Robustness] = None  # its robustness.json, checked against the card and items


def load_entry(directory: Path) -> Entry:
    """One stored entry; an ``EtbenchError`` naming the file when it is incomplete or corrupt (a missing
    ``submission.json`` or items file, unreadable JSON, or bytes that no longer match the hashes recorded
    when it was submitted)."""
    directory = Path(directory)
    meta = read_json(directory / "submission.json", "submission record")
    if not isinstance(meta, dict):
        raise EtbenchError(f"{directory / 'submission.json'}: not a JSON object")
    card_path = directory / "scorecard.json"
    card = sc.load(card_path)
    items_path = sc.items_path(card_path, card)
    items = sc.load_items(card_path, card)  # rows checked
    for what, path in (("scorecard", card_path), ("items", items_path)):
        want = meta.get(f"{what}_sha256")
        if want is not None and hashlib.sha256(path.read_bytes()).hexdigest() != want:
            raise EtbenchError(f"{path}: its bytes differ from those submitted ({what}_sha256 in submission.json)")
    return Entry(meta.get("name", directory.name), meta, card, items)


def load_entries(results_dir: Path, exclude: tuple[str, ...] = (), problems: Optional[list[str]] = None) -> list[Entry]:
    """Every complete stored entry. An incomplete or corrupt one is skipped and described in ``problems``
    (raised instead when ``problems`` is None)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    entries = []
    for d in sorted(results_dir.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name in exclude:
            continue
        try:
            entry = load_entry(d)
        except EtbenchError as err:
            if problems is None:
                raise
            problems.append(f"skipped stored entry {d.name!r}: {err}")
            continue
        try:  # a robustness file that its rows do not reproduce is refused; the row stays without it
            entry.robustness = robustness.load_checked(d / "scorecard.json", entry.card, entry.items)
        except EtbenchError as err:
            if problems is None:
                raise
            problems.append(f"left out the robustness of {d.name!r}: {err}")
        entries.append(entry)
    return entries


def paper_results() -> dict[str, Any]:
    return json.loads(PAPER_RESULTS.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------

def _est(e: Optional[sc.Estimate]) -> dict[str, Any]:
    if e is None:
        return {"value": None, "low": None, "high": None, "n": None, "method": None, "note": ""}
    return {"value": e.value, "low": e.low, "high": e.high, "n": e.n, "method": e.method, "note": e.note}


def _num(value: Optional[float], note: str = "") -> dict[str, Any]:
    return {"value": value, "low": None, "high": None, "n": None, "method": None if value is None else "reported",
            "note": note}


def _chance(chance: Optional[sc.OverlapChance]) -> dict[str, Any]:
    """An overlap's chance level: an expectation under random sets, not an estimate, so no CI."""
    if chance is None:
        return _est(None)
    return {"value": chance.base_in_ft, "low": None, "high": None, "n": chance.pool, "method": chance.method,
            "note": ""}


#: Heads of the paper's models (Llama-7B shape: 32 layers x 32 heads), the pool of their chance overlap.
PAPER_HEAD_POOL = 32 * 32


def pick_accuracy(card: sc.Scorecard, model: str, n_boxes: int = 7) -> Optional[sc.Estimate]:
    return next((a.accuracy for a in card.accuracy if a.model == model and a.n_boxes == n_boxes), None)


def pick_faithfulness(card: sc.Scorecard, circuit: str = "base", model: str = "ft") -> Optional[sc.FaithfulnessScore]:
    return next((f for f in card.faithfulness if f.circuit == circuit and f.model == model), None)


def pick_overlap(card: sc.Scorecard, heads: str = "circuit", group: str = "all") -> Optional[sc.OverlapScore]:
    return next((o for o in card.overlap if o.heads == heads and o.group == group), None)


def headline_overlap(card: sc.Scorecard) -> Optional[sc.OverlapScore]:
    """The leaderboard's head overlap: the circuits cut to equal size where the card has it (sized circuits
    differ several-fold in size, and a larger fine-tuned set holds more base heads whatever they are), the
    circuits as found otherwise (cards written before it was kept)."""
    return pick_overlap(card, "circuit-top") or pick_overlap(card)


#: The edge type of the leaderboard's rewiring column (docs/method.md §13): the hop into the value fetchers, which
#: separated the planted row from the null row where C->B, A->logits and all types pooled did not (n 32).
REWIRING_EDGE = "B->A"


def pick_rewiring(card: sc.Scorecard, edge: str = REWIRING_EDGE) -> Optional[sc.EdgeTypeScore]:
    """The card's edges row of one edge type (None where the card carries no edges, or not that type)."""
    rows = card.edges.rows if card.edges is not None else []
    return next((r for r in rows if r.type == edge), None)


def rewiring_chance(row: Optional[sc.EdgeTypeScore]) -> Optional[float]:
    """Rewiring by chance: 1 - the overlap expected when the fine-tune's top edges are a random k of the M."""
    return None if row is None or row.chance is None else 1 - row.chance.base_in_ft


def pick_cmap(card: sc.Scorecard, group: str = "full", variant: str = "output",
              heads: str = "dcm") -> Optional[sc.CmapScore]:
    # heads "dcm" is the paper's rule; a card also holds "circuit" rows for the same group and variant
    return next((c for c in card.cmap if c.group == group and c.variant == variant and c.heads == heads), None)


#: Head sets of the per-group overlap figure: (scorecard ``OverlapScore.heads``, panel title).
OVERLAP_HEADS = (("circuit-top", "circuit heads, top k at equal size"), ("circuit", "circuit heads as sized"),
                 ("dcm", "DCM heads (CI over DCM seeds)"))


def overlap_by_group(card: sc.Scorecard) -> dict[str, dict[str, Any]]:
    """``{"circuit/value_fetcher": estimate, ...}``: base heads recovered in ft, per head set and group."""
    return {f"{o.heads}/{o.group}": _est(o.base_in_ft) for o in card.overlap if o.group != ALL}


def overlap_chance_by_group(card: sc.Scorecard) -> dict[str, float]:
    """``{"circuit-top/value_fetcher": chance, ...}``: the overlap a random head set would have, per head set
    and group (circuit rows only: DCM rows have no chance level)."""
    return {f"{o.heads}/{o.group}": o.chance.base_in_ft for o in card.overlap
            if o.group != ALL and o.chance is not None}


COLUMNS = (  # key, header, kind
    ("rank", "#", "rank"),
    ("name", "Model", "text"),
    ("method", "Fine-tuning", "text"),
    ("accuracy_gain", "Δaccuracy (ft − base)", "est"),
    ("reuse", "Mechanism reuse", "est"),
    ("gain_explained", "Gain explained", "est"),
    ("rewiring", "Rewiring (B→A edges)", "est"),
    ("accuracy", "Accuracy (7 boxes)", "est"),
    ("base_accuracy", "Base accuracy", "est"),
    ("faithfulness", "Faithfulness of base circuit on ft", "est"),
    ("head_overlap", "Head overlap (base circuit in ft, at equal size)", "est"),
    ("head_overlap_chance", "… by chance (random heads, same sizes)", "est"),
    ("cmap_gain", "CMAP gain (full circuit)", "est"),
    ("delta_p_holm", "Δacc McNemar p (Holm)", "p"),
    ("protocol", "Protocol", "text"),
    ("benchmark_version", "Version", "text"),
    ("submitted", "Date", "text"),
)
#: Columns the page's compact view hides (each figure stays in the CSV, JSON, Markdown and the row's report).
DETAIL_COLUMNS = frozenset({"accuracy", "base_accuracy", "faithfulness", "head_overlap", "head_overlap_chance",
                            "cmap_gain", "benchmark_version", "report"})
#: Short text columns kept on one line.
NOWRAP = frozenset({"rank", "name", "protocol", "benchmark_version", "submitted"})
#: What each headline column means, shown as the header's tooltip (docs/method.md, "Headline scores").
COLUMN_HELP = {
    "rank": "rank within the base's rows by Δaccuracy (point estimate)",
    "accuracy_gain": "fine-tuned minus base 7-box accuracy on the same prompts, paired bootstrap 95% CI",
    "reuse": "equal-size head overlap rescaled: 0 = a random head set, 1 = the base circuit's own heads; "
             "95% CI over the base cut's heads (Wilson)",
    "gain_explained": "CMAP gain of the full circuit / the accuracy change on CMAP's items; undefined where that "
                      "change's 95% CI contains 0",
    "rewiring": "1 − overlap of the base's and the fine-tune's top 25% B→A edges (position transmitters into value "
                "fetchers, path patching); 95% CI over prompts; by chance: the fine-tune's top edges drawn at random; "
                "— where the card carries no edges",
    "protocol": "scoring preset (hover: config hash); rows compare directly only under one protocol",
    "submitted": "date the scorecard was submitted (UTC)",
}
GROUP_PAPER_SUFFIX = " (reported by the paper, not measured here)"


def entry_row(entry: Entry) -> dict[str, Any]:
    card = entry.card
    faith = pick_faithfulness(card)
    overlap = headline_overlap(card)
    cmap = pick_cmap(card)
    rewiring = pick_rewiring(card)
    preset = card.config.get("preset")
    base = entry.submission.get("base_ref", card.base.ref)
    return {
        "name": entry.name,
        "origin": "measured",
        "note": MEASURED_NOTE,
        "base": base,
        "group": base,
        "rank": None,  # within the group, set by rows_for
        "model_ref": entry.submission.get("model_ref", card.ft.ref),
        "method": entry.submission.get("fine_tuning", {}).get("method", ""),
        "accuracy_gain": _est(None),  # the paired McNemar difference, set by rows_for
        "reuse": _est(None),  # headline scores, set by rows_for with the accuracy change
        "reuse_by_group": {},
        "gain_explained": _est(None),
        "verdict": "",
        "accuracy": _est(pick_accuracy(card, "ft")),
        "base_accuracy": _est(pick_accuracy(card, "base")),
        "faithfulness": _est(faith.faithfulness if faith else None),
        # the ft model's accuracy on the faithfulness prompts is at the chance floor: the ratio describes nothing
        "faithfulness_at_chance": report.model_at_chance(card, "ft") if faith else None,
        "head_overlap": _est(overlap.base_in_ft if overlap else None),
        "head_overlap_chance": _chance(overlap.chance if overlap else None),
        "cmap_gain": _est(cmap.gain if cmap else None),
        "rewiring": _est(rewiring.rewiring if rewiring else None),
        "rewiring_chance": rewiring_chance(rewiring),
        "overlap_by_group": overlap_by_group(card),
        "overlap_chance_by_group": overlap_chance_by_group(card),
        "report": f"reports/{entry.name}.html",
        "protocol": preset.get("name", "") if isinstance(preset, dict) else str(preset or ""),
        "config_hash": card.config_hash,
        "benchmark_version": card.provenance.benchmark_version,
        "submitted": entry.submission.get("submitted"),
        "delta_p": None,
        "delta_p_holm": None,
    }


def _paper_circuit_key(name: str) -> Optional[str]:
    """The shipped paper circuit of a paper row ("Goat-7B" -> "goat7b"), if there is one."""
    key = name.lower().replace("-", "")
    return key if key in PAPER_CIRCUITS else None


def paper_overlap_by_group(name: str, base: str) -> dict[str, dict[str, Any]]:
    """Per-group base-in-ft overlap of a paper row, derived from the paper's published circuit files (as its
    ``head_overlap_circuit`` is); {} for the base itself or a row without a published circuit."""
    key, base_key = _paper_circuit_key(name), _paper_circuit_key(base)
    if key is None or base_key is None or key == base_key:
        return {}
    found = group_overlaps(paper_circuit(base_key), paper_circuit(key))
    return {f"circuit/{g}": _num(None if found[g].base_in_ft is None else round(found[g].base_in_ft, 4))
            for g in GROUPS if g in found}


def paper_overlap_chance(name: str, base: str) -> dict[str, Any]:
    """The chance level of a paper row's all-group overlap, from the published circuit files."""
    key, base_key = _paper_circuit_key(name), _paper_circuit_key(base)
    if key is None or base_key is None or key == base_key:
        return _chance(None)
    found = group_overlaps(paper_circuit(base_key), paper_circuit(key))
    return _chance(chance_overlap(found[ALL], PAPER_HEAD_POOL))


def paper_overlap_chance_by_group(name: str, base: str) -> dict[str, float]:
    """Per-group chance level of a paper row's overlap (its circuit's group size over the model's heads)."""
    key, base_key = _paper_circuit_key(name), _paper_circuit_key(base)
    if key is None or base_key is None or key == base_key:
        return {}
    found = group_overlaps(paper_circuit(base_key), paper_circuit(key))
    return {f"circuit/{g}": chance.base_in_ft for g in GROUPS if g in found
            and (chance := chance_overlap(found[g], PAPER_HEAD_POOL)) is not None}


PAPER_REUSE_NOTE = ("undefined: the paper's circuits are published in no importance order, so they cannot be cut to "
                    "equal size")


def paper_rows() -> list[dict[str, Any]]:
    data = paper_results()
    base_acc = data["base_accuracy"]
    rows = []
    for r in data["rows"]:
        gain = None if r.get("cmap_full") is None else round(r["cmap_full"] - base_acc[r["base"]], 4)
        acc_gain = None if r.get("accuracy") is None else round(r["accuracy"] - base_acc[r["base"]], 4)
        # the normalised CMAP gain of two reported figures; no CI, so "within noise" cannot be told
        explained = round(gain / acc_gain, 4) if gain is not None and acc_gain else None
        rows.append({
            "name": r["name"],
            "origin": "paper",
            "note": PAPER_NOTE,
            "base": r["base"],
            "group": r["base"] + GROUP_PAPER_SUFFIX,
            "rank": None,
            "model_ref": r["name"],
            "method": r["fine_tuning"],
            "accuracy_gain": _num(acc_gain),
            "reuse": _num(None, PAPER_REUSE_NOTE),
            "reuse_by_group": {},
            "gain_explained": _num(explained, "" if explained is not None else "undefined: no CMAP figure or no "
                                   "accuracy change reported"),
            "verdict": "",
            "accuracy": _num(r["accuracy"]),
            "base_accuracy": _num(base_acc[r["base"]]),
            "faithfulness": _num(r["faithfulness"]),
            "faithfulness_at_chance": None,  # reported without a CI: not testable
            "head_overlap": _num(r.get("head_overlap_circuit")),
            "head_overlap_chance": paper_overlap_chance(r["name"], r["base"]),
            "cmap_gain": _num(gain),
            "rewiring": _num(None, "not measured: the paper scored no edges"),
            "rewiring_chance": None,
            "overlap_by_group": paper_overlap_by_group(r["name"], r["base"]),
            "overlap_chance_by_group": paper_overlap_chance_by_group(r["name"], r["base"]),
            "report": None,
            "protocol": "paper",
            "config_hash": None,
            "benchmark_version": None,
            "submitted": None,
            "delta_p": None,
            "delta_p_holm": None,
        })
    return rows


def _by_accuracy_change(row: dict[str, Any]):
    gain = row["accuracy_gain"]["value"]
    return (gain is None, -(gain if gain is not None else 0.0), row["name"])


def group_order(rows: list[dict[str, Any]]) -> list[str]:
    """Bases in the order the page shows them: measured groups by size (then name), the paper's last."""
    sizes: dict[str, int] = {}
    paper = set()
    for row in rows:
        sizes[row["group"]] = sizes.get(row["group"], 0) + 1
        if row["origin"] == "paper":
            paper.add(row["group"])
    return sorted(sizes, key=lambda g: (g in paper, -sizes[g], g))


def rows_for(entries: list[Entry], include_paper: bool = True) -> list[dict[str, Any]]:
    """All rows, grouped by base and ranked within each group by Δaccuracy, with the headline scores and the
    ft-vs-base accuracy McNemar p-values Holm-corrected across submissions."""
    rows = [entry_row(e) for e in entries]
    ps = []
    for row, entry in zip(rows, entries):
        test = report.accuracy_tests(entry.card, entry.items, n_boxes=(7,))
        row["delta_p"] = test[0].p_value if test else None
        top = report.row_headline(entry.card, test[0] if test else None)
        # ft - base on the same items, paired bootstrap CI (the report's "accuracy, 7 boxes" row)
        row["accuracy_gain"] = _est(top.accuracy_change)
        row["reuse"], row["gain_explained"] = _est(top.reuse), _est(top.gain_explained)
        row["reuse_by_group"] = {g: _est(e) for g, e in top.reuse_by_group.items() if g != ALL}
        row["verdict"] = headline.verdict(top, entry.name)
        ps.append(row["delta_p"])
    present = [p for p in ps if p is not None]
    adjusted = iter(stats.adjust_pvalues(present, "holm").adjusted)
    for row in rows:
        if row["delta_p"] is not None:
            row["delta_p_holm"] = next(adjusted)
    if include_paper:
        rows += paper_rows()
    order = group_order(rows)
    ranked = []
    for group in order:
        members = sorted((r for r in rows if r["group"] == group), key=_by_accuracy_change)
        for i, row in enumerate(members, 1):
            row["rank"] = i
        ranked += members
    return ranked


# ---------------------------------------------------------------------------------------------
# Rendering (pure: same inputs, same bytes)
# ---------------------------------------------------------------------------------------------

def fmt(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def fmt_est(e: dict[str, Any], signed: bool = False) -> str:
    # the paper reported 2 decimals: its numbers are shown as reported, not padded to 3
    return format_estimate(e["value"], e["low"], e["high"], digits=2 if e.get("method") == "reported" else 3,
                           signed=signed)


#: Estimates shown with their sign (changes and rescaled scores that may fall below 0).
SIGNED = frozenset({"accuracy_gain", "reuse", "cmap_gain"})


def _at_chance(row: dict[str, Any], key: str) -> bool:
    return key == "faithfulness" and bool(row.get("faithfulness_at_chance"))


def _chance_suffix(row: dict[str, Any], key: str) -> str:
    """The rewiring column's chance level after its estimate."""
    chance = row.get(f"{key}_chance") if key == "rewiring" and row[key]["value"] is not None else None
    return "" if chance is None else f" (chance {chance:.2f})"


def _cell_text(row: dict[str, Any], key: str, kind: str) -> str:
    if kind == "est":
        return report.with_chance_mark(fmt_est(row[key], key in SIGNED), _at_chance(row, key)) + _chance_suffix(row, key)
    if kind == "p":
        return format_p(row[key])
    if row[key] is None:
        return "—"
    if key == "origin" and row[key] == "paper":
        return "paper (reported, not measured here)"
    return str(row[key])


#: Row fields written to the CSV before the columns' own (identity and grouping).
CSV_LEAD = ("group", "rank", "name", "origin", "note", "base", "model_ref", "method")
#: Per-group reuse, in the CSV as reuse_<group> columns.
CSV_GROUPS = tuple(GROUPS)


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    header = list(CSV_LEAD)
    for key, _, kind in COLUMNS:
        if kind == "est":
            header += [key, f"{key}_low", f"{key}_high", f"{key}_n"]
        if key == "faithfulness":
            header.append("faithfulness_at_chance")
        if key == "rewiring":
            header.append("rewiring_chance")
        if key == "reuse":
            header += [f"reuse_{g}{end}" for g in CSV_GROUPS for end in ("", "_low", "_high")]
    header += ["delta_p", "delta_p_holm", "protocol", "config_hash", "benchmark_version", "submitted", "report"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        out = [row[k] for k in CSV_LEAD]
        for key, _, kind in COLUMNS:
            if kind == "est":
                e = row[key]
                out += [e["value"], e["low"], e["high"], e["n"]]
            if key == "faithfulness":
                out.append(row["faithfulness_at_chance"])
            if key == "rewiring":
                out.append(row["rewiring_chance"])
            if key == "reuse":
                for g in CSV_GROUPS:
                    e = row["reuse_by_group"].get(g) or _est(None)
                    out += [e["value"], e["low"], e["high"]]
        out += [row[k] for k in ("delta_p", "delta_p_holm", "protocol", "config_hash", "benchmark_version",
                                 "submitted", "report")]
        writer.writerow(["" if v is None else v for v in out])
    return buf.getvalue()


HEADLINE_NOTE = ("Headline scores (docs/method.md, \"Headline scores\"): mechanism reuse = the equal-size head "
                 "overlap rescaled so that a random head set scores 0 and the base circuit itself 1 (95% CI over the "
                 "base cut's heads, Wilson); gain explained = the full circuit's CMAP gain over the fine-tune's "
                 "accuracy change on CMAP's items (undefined where that change's 95% CI contains 0). Rows are "
                 "grouped by base and ranked within it by Δaccuracy.")


def render_json(rows: list[dict[str, Any]]) -> str:
    return dumps_json({
        "benchmark_version": sc.BENCHMARK_VERSION,
        "paper": paper_results()["paper"],
        "paper_note": PAPER_NOTE,
        "headline_note": HEADLINE_NOTE,
        "faithfulness_at_chance_note": report.CHANCE_LEGEND,
        "columns": [{"key": k, "header": h} for k, h, _ in COLUMNS],
        "groups": group_order(rows),
        "rows": rows,
    })


METHOD_DOC = "../docs/method.md"
SUBMIT_DOC = "../submissions/README.md"
PAPER_URL = "https://arxiv.org/abs/2402.14811"


def render_markdown(rows: list[dict[str, Any]], matrix: Optional[comparisons.Matrix] = None) -> str:
    lines = [
        "# etbench leaderboard",
        "",
        f"Benchmark version {sc.BENCHMARK_VERSION}. Generated by `etbench leaderboard build` from "
        "`submissions/results/`; do not edit. Values are estimates with 95% CIs in brackets.",
        HEADLINE_NOTE,
        f"Rows marked *paper* are **{PAPER_NOTE}** (their head overlap is derived from the paper's published "
        f"circuit files; [the paper]({PAPER_URL})). CMAP gain = accuracy of the base model with the fine-tuned "
        "model's circuit activations patched in, minus the base model's accuracy. Rewiring = 1 − the overlap of "
        "the base's and the fine-tune's top 25% B→A edges (docs/method.md §13), with its chance level; — where "
        "the scorecard carries no edges. "
        f"Method: [docs/method.md]({METHOD_DOC}); how to submit: [submissions/README.md]({SUBMIT_DOC}).",
        "",
    ]
    for group in group_order(rows):
        lines += [f"## {group}", "",
                  "| " + " | ".join(h for _, h, _ in COLUMNS) + " | Report |",
                  "|" + "---|" * (len(COLUMNS) + 1)]
        for row in (r for r in rows if r["group"] == group):
            cells = [_cell_text(row, k, kind).replace("|", "\\|") for k, _, kind in COLUMNS]
            cells.append(f"[report]({row['report'].removesuffix('.html')}.md)" if row["report"] else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if any(row["faithfulness_at_chance"] for row in rows):
        lines += [report.CHANCE_LEGEND, ""]
    if matrix is not None:
        lines += comparisons.render_markdown(matrix)
    lines += ["Figures (accuracy gain vs CMAP gain, head overlap per group) are in `index.html`.", ""]
    return "\n".join(lines)


CSP = content_security_policy(scripts=True)

_STYLE = BASE_CSS + """
body{max-width:none}
table.board th{cursor:pointer;user-select:none;position:relative}
table.board th[aria-sort=ascending]::after{content:" \\25B2"} table.board th[aria-sort=descending]::after{content:" \\25BC"}
table.board{font-size:13px}
table.board th,table.board td{padding:4px 6px}
table.board td.est,table.board td.p,table.board td.nowrap{white-space:nowrap;font-variant-numeric:tabular-nums}
table.board td.est .chance{display:block}
table.board td.est .ci{white-space:nowrap}
@media (max-width:1250px){table.board td.est{white-space:normal}}
.scroll{overflow-x:auto}
table.board td.method{max-width:11em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
table.board th.headline,table.board td.headline{background:#f3f7ff}
table.board tr.paper td{background:#fff8e6;font-style:italic}
.compact table.board .detail{display:none}
td a{color:inherit}
.ci{color:#666;font-size:12px}
.note{color:#8a5a00}
.floor{color:#b00020;font-weight:bold;cursor:help}
.controls{margin:0.5em 0;display:flex;gap:1.5em;flex-wrap:wrap;align-items:center}
.controls input[type=search]{width:16em}
tr[hidden]{display:none}
table.matrix td.pair{font-size:12px}
table.matrix td.significant{font-weight:bold;background:#eef5ee}
table.matrix .k{color:#666}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top;max-width:100%}
svg{max-width:100%;height:auto}
"""

# Plain JS (about 40 lines): sorting, a text filter and the compact view. A vendored table library would add
# tens of kilobytes and a licence to ship for what these few handlers do.
_SCRIPT = """
(function(){
  var tables=Array.prototype.slice.call(document.querySelectorAll('table.board'));
  function key(td){var v=td.getAttribute('data-sort');var f=parseFloat(v);
    return (v===''||v===null)?null:(isNaN(f)?v.toLowerCase():f);}
  function sortBy(table,i,dir){
    var ths=table.tHead.rows[0].cells;var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
      if(x===null&&y===null)return 0;if(x===null)return 1;if(y===null)return -1;
      if(x<y)return -dir;if(x>y)return dir;return 0;});
    rows.forEach(function(r){body.appendChild(r);});
    for(var j=0;j<ths.length;j++)ths[j].removeAttribute('aria-sort');
    ths[i].setAttribute('aria-sort',dir>0?'ascending':'descending');
  }
  tables.forEach(function(table){var ths=table.tHead.rows[0].cells;
    for(var i=0;i<ths.length;i++)(function(i){ths[i].addEventListener('click',function(){
      sortBy(table,i,ths[i].getAttribute('aria-sort')==='ascending'?-1:1);});})(i);});
  var filter=document.getElementById('filter');
  function applyFilter(){var q=filter.value.toLowerCase().trim();
    tables.forEach(function(table){Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
      r.hidden=q!==''&&r.getAttribute('data-search').indexOf(q)<0;});});}
  filter.addEventListener('input',applyFilter);
  var compact=document.getElementById('compact');
  function applyCompact(){document.body.classList.toggle('compact',compact.checked);}
  // the full view unless a table would need a horizontal scroll; #full or #compact in the address decides
  function fits(){return tables.every(function(t){return t.scrollWidth<=t.parentNode.clientWidth;});}
  compact.checked=false;applyCompact();
  if(location.hash==='#compact'||(location.hash!=='#full'&&!fits())){compact.checked=true;applyCompact();}
  compact.addEventListener('change',applyCompact);
  window.etbenchSort=function(tableId,i,dir){sortBy(document.getElementById(tableId),i,dir);};
  window.etbenchFilter=function(q){filter.value=q;applyFilter();};
})();
"""


def _sort_value(row: dict[str, Any], key: str, kind: str) -> str:
    if kind == "est":
        v = row[key]["value"]
        return "" if v is None else repr(float(v))
    if kind in ("p", "rank"):
        return "" if row[key] is None else repr(float(row[key]))
    return "" if row[key] is None else str(row[key])


def _interval(e: dict[str, Any]) -> Optional[stats.Interval]:
    if e["value"] is None:
        return None
    return stats.Interval(e["value"], e["low"], e["high"], e["n"] or 0, e["method"] or "")


def figure_points(rows: list[dict[str, Any]]) -> list[report.PlotPoint]:
    """Each row's accuracy gain, CMAP gain and per-group overlap (with its chance level), as the page's
    figures draw them."""
    points = []
    for row in rows:
        values = {k: _interval(row[k]) for k in ("accuracy_gain", "cmap_gain")}
        values.update({k: _interval(e) for k, e in row["overlap_by_group"].items()})
        points.append(report.PlotPoint(row["name"], {k: v for k, v in values.items() if v is not None},
                                       reported=row["origin"] == "paper", url=row["report"],
                                       chance=dict(row.get("overlap_chance_by_group") or {})))
    return points


def render_figures(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Inline SVG figures of the page, keyed by element id (only those with something to draw)."""
    points = figure_points(rows)
    figures = {"figure-gain-vs-cmap": report.fig_gain_vs_cmap(points),
               "figure-overlap-by-group": report.fig_group_overlap(points, OVERLAP_HEADS)}
    return {k: v for k, v in figures.items() if v}


FIGURE_CAPTIONS = {
    "figure-robustness": "Left: accuracy (7 boxes, 95% Wilson CI) in the paper's wording and two wordings held out "
                         "from every fine-tune, for each base and each fine-tune with a robustness.json. Right: the "
                         "robustness figures of each row, held-out wordings minus the paper's: the fine-tune's gain "
                         "over the base, and its own circuit's faithfulness (0 on the dashed line: the held-out "
                         "wordings behave as the paper's; 95% paired bootstrap CIs over items; docs/method.md §14).",
    "figure-gain-vs-cmap": "Accuracy gain (fine-tuned minus base, 7 boxes, paired 95% CI) against the CMAP gain "
                           "of the full circuit (the base with the fine-tuned model's circuit activations patched "
                           "in, minus the base). Hollow diamonds: reported by the paper, no CI. Each marker links "
                           "to the report that produced it.",
    "figure-overlap-by-group": "Share of the base circuit's heads of each group that the fine-tuned model's "
                               "circuit also holds. The short pale bar by each marker, in its colour, is the "
                               "share a random head set of the same size would hold (chance); DCM heads have no "
                               "chance line (each model's DCM heads are drawn from its own circuit). Error bars "
                               "only where the scorecard has a CI (DCM heads over several seeds); hollow markers: "
                               "derived from the paper's published circuits.",
}


def _header_cell(key: str, header: str) -> str:
    esc = html.escape
    classes = " ".join(c for c in ("detail" if key in DETAIL_COLUMNS else "",
                                   "headline" if key in ("accuracy_gain", "reuse", "gain_explained") else "") if c)
    title = f' title="{esc(COLUMN_HELP[key])}"' if key in COLUMN_HELP else ""
    cls = f' class="{classes}"' if classes else ""
    return f'<th scope="col" data-key="{key}"{title}{cls}>{esc(header)}</th>'


def _row_html(row: dict[str, Any]) -> str:
    esc = html.escape
    cells = []
    for key, _, kind in COLUMNS:
        text = _cell_text(row, key, kind)
        e = row[key] if kind == "est" else None
        if e is not None and e["value"] is not None and e["low"] is not None and e["low"] != e["high"]:
            sign = "+" if key in SIGNED else ""
            text = (f'{e["value"]:{sign}.3f} <span class="ci">[{e["low"]:{sign}.3f}, '
                    f'{e["high"]:{sign}.3f}]</span>')
            if _at_chance(row, key):
                text += f' <span class="floor" title="{esc(report.CHANCE_LEGEND)}">{report.CHANCE_MARK}</span>'
            suffix = _chance_suffix(row, key).strip()
            # on a line of its own: after the estimate and its CI it made the column too wide for 1100 px
            text += f' <span class="ci chance">{esc(suffix)}</span>' if suffix else ""
        else:
            text = esc(text)
        if (kind in ("est", "p") or key == "name") and row["report"] and text != "—":
            text = f'<a href="{esc(row["report"])}">{text}</a>'  # the row's name and every measured number: its report
        title = ""
        if kind == "est" and e is not None and e.get("note"):
            title = f' title="{esc(e["note"])}"'
        elif key == "method":
            title = f' title="{esc(str(row[key]))}"'
        elif key == "protocol" and row.get("config_hash"):
            title = f' title="config hash {esc(row["config_hash"])}"'
        classes = " ".join(c for c in (kind if kind in ("est", "p") else "", "method" if key == "method" else "",
                                       "nowrap" if key in NOWRAP else "",
                                       "detail" if key in DETAIL_COLUMNS else "",
                                       "headline" if key in ("accuracy_gain", "reuse", "gain_explained") else "")
                           if c)
        cls = f' class="{classes}"' if classes else ""
        cells.append(f'<td data-sort="{esc(_sort_value(row, key, kind))}"{cls}{title}>{text}</td>')
    link = (f'<a href="{esc(row["report"])}">report</a>' if row["report"] else "—")
    cells.append(f'<td data-sort="" class="detail">{link}</td>')  # compact view: the name links to it
    cls = "paper" if row["origin"] == "paper" else "measured"
    search = " ".join(str(row[k] or "") for k in ("name", "method", "base", "model_ref", "protocol")).lower()
    verdict = f' title="{esc(row["verdict"])}"' if row.get("verdict") else ""
    return (f'<tr class="{cls}" data-name="{esc(row["name"])}" data-search="{esc(search)}"{verdict}>'
            + "".join(cells) + "</tr>")


def group_id(group: str) -> str:
    """The HTML id of a base's table: ``board-`` and the base's name in lower-case letters, digits and dashes."""
    return "board-" + "".join(c if c.isalnum() else "-" for c in group.lower()).strip("-")


def _tables_html(rows: list[dict[str, Any]]) -> str:
    esc = html.escape
    head = "".join(_header_cell(k, h) for k, h, _ in COLUMNS) + '<th class="detail">Report</th>'
    out = []
    for group in group_order(rows):
        members = [r for r in rows if r["group"] == group]
        paper = members[0]["origin"] == "paper"
        title = (f"Reported by the paper: {esc(members[0]['base'])} and its fine-tunes (not measured here)" if paper
                 else f"Fine-tunes of {esc(group)}")
        out.append(f'<h2 id="{group_id(group)}-title">{title}</h2>\n'
                   f'<div class="scroll"><table class="board" id="{group_id(group)}"><thead><tr>{head}</tr></thead>\n'
                   f"<tbody>\n" + "\n".join(_row_html(r) for r in members) + "\n</tbody></table></div>")
    return "\n".join(out)


_SUBMIT_HTML = f"""<h2 id="submit">How to submit</h2>
<ol>
<li>Score your fine-tune against its base under the leaderboard's protocol:
<code>etbench score --base BASE --ft YOUR_MODEL --preset standard --out DIR</code> (a Hugging Face directory,
an adapter or a hub id with a revision; on a GPU if you have one).</li>
<li>Describe it in <code>submissions/NAME.yaml</code> (model, base, fine-tuning data and method, licence, contact,
the scorecard): the format is in <a href="{SUBMIT_DOC}">submissions/README.md</a>.</li>
<li><code>etbench submit submissions/NAME.yaml</code> checks every number of the scorecard against its per-item
rows, stores it under <code>submissions/results/NAME/</code> and rebuilds this page; send the YAML and that
directory for review.</li>
</ol>
"""


def render_html(rows: list[dict[str, Any]], matrix: Optional[comparisons.Matrix] = None,
                figures: Optional[dict[str, str]] = None, robustness_text: str = "") -> str:
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>etbench leaderboard</title>
<style>{_STYLE}</style></head>
<body>
<h1>etbench leaderboard</h1>
<p>Benchmark version {esc(sc.BENCHMARK_VERSION)}. How fine-tuning changes a model's entity-tracking mechanism
(Prakash et al., <a href="{PAPER_URL}">Fine-Tuning Enhances Existing Mechanisms</a>, ICLR 2024). Values are
estimates with 95% CIs in brackets; hover a header for its definition, a row for its one-line verdict. Method:
<a href="{METHOD_DOC}#headline-scores">docs/method.md</a>; <a href="#submit">how to submit</a>.</p>
<p><strong>Headline scores.</strong> <em>Mechanism reuse</em>: the base and fine-tuned circuits cut to equal
size; the share of the base's heads found again, rescaled so that a random head set scores 0 and the base
circuit itself 1 (CI over the base cut's heads). <em>Gain explained</em>: patching the fine-tune's DCM heads into
the base recovers this fraction of its accuracy change (undefined where the change is within noise). Rows are
grouped by base and ranked by Δaccuracy; rows of different bases are not comparable.</p>
<div class="controls"><label>Filter rows <input type="search" id="filter" placeholder="name, method, base…"></label>
<label><input type="checkbox" id="compact"> compact view (hides the accuracies, faithfulness, raw overlap,
CMAP gain, version and the report column: a row's name links to its report)</label></div>
{_tables_html(rows)}
<p class="note">Italic rows are <strong>{esc(PAPER_NOTE)}</strong> (head overlap derived from the paper's
published circuit files).</p>
{_chance_legend_html(rows)}{_figures_html(figures or {})}
{f'<p class="note" id="robustness-rows">{esc(robustness_text)}</p>' if robustness_text else ""}
{comparisons.render_html(matrix) if matrix is not None else ""}
{_SUBMIT_HTML}
<script>{_SCRIPT}</script>
</body></html>
"""


def _chance_legend_html(rows: list[dict[str, Any]]) -> str:
    if not any(row["faithfulness_at_chance"] for row in rows):
        return ""
    return f'<p class="note" id="legend-chance">{html.escape(report.CHANCE_LEGEND)}</p>\n'


def _figures_html(figures: dict[str, str]) -> str:
    if not figures:
        return ""
    return "<h2>Figures</h2>\n" + "\n".join(
        f'<figure id="{k}">{svg}<figcaption>{html.escape(FIGURE_CAPTIONS[k])}</figcaption></figure>'
        for k, svg in figures.items())


def robustness_figure(entries: list[Entry]) -> dict[str, str]:
    """The accuracy-by-wording and robustness figure over the rows that have a ``robustness.json``, per base."""
    rows = [(e.name, e.robustness) for e in sorted(entries, key=lambda e: (e.card.base.ref, e.name)) if e.robustness]
    svg = report.fig_robustness(rows)
    return {"figure-robustness": svg} if svg else {}


def robustness_note(entries: list[Entry]) -> str:
    """Which rows the robustness figure shows, and which have no robustness measured."""
    missing = sorted(e.name for e in entries if e.robustness is None)
    if not missing:
        return ""
    return (f"Template robustness not measured for {', '.join(missing)} (no robustness.json beside the scorecard; "
            "the figure shows nothing for them).")


def robustness_markdown(entries: list[Entry]) -> str:
    """The robustness table of ``leaderboard.md``: accuracy per wording, the gain per wording and the robustness
    figures of each row that has them (docs/method.md §14)."""
    measured = [e for e in sorted(entries, key=lambda e: (e.card.base.ref, e.name)) if e.robustness]
    if not measured:
        return ""
    wordings = measured[0].robustness.wordings
    header = (["row", "n"] + [f"ft accuracy, {w}" for w in wordings] + [f"ft − base, {w}" for w in wordings]
              + ["gain carry-over", "ft circuit carry-over", "base circuit carry-over"])
    lines = ["## Template robustness (held-out wordings)", "",
             "Per row: the fine-tune's accuracy in the paper's wording and two held out from every fine-tune, its "
             "gain over the base in each (paired), and the robustness figures: held-out wordings minus the "
             f"paper's, for the gain and for each circuit's faithfulness ([method.md §14]({METHOD_DOC})). 95% CIs.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in measured:
        s = e.robustness.summary
        cells = ([e.name, str(e.robustness.n)]
                 + [format_estimate_of(s.pick_accuracy(w, "ft").accuracy) for w in wordings]
                 + [format_estimate_of(next(g.gain for g in s.gain if g.wording == w), signed=True) for w in wordings]
                 + [format_estimate_of(x, signed=True) for x in (s.gain_carryover, s.carryover["ft"],
                                                                  s.carryover["base"])])
        lines.append("| " + " | ".join(cells) + " |")
    note = robustness_note(entries)
    return "\n".join(lines + ([""] + [note] if note else []) + [""]) + "\n"


def render(entries: list[Entry], include_paper: bool = True) -> dict[str, bytes]:
    """Every file of ``leaderboards/``, keyed by relative path."""
    rows = rows_for(entries, include_paper)
    matrix = comparisons.pair_matrix(entries)
    files = {
        "leaderboard.csv": render_csv(rows),
        "leaderboard.json": render_json(rows),
        "leaderboard.md": render_markdown(rows, matrix) + robustness_markdown(entries),
        "index.html": render_html(rows, matrix, {**render_figures(rows), **robustness_figure(entries)},
                                  robustness_note(entries)),
        "comparisons.json": dumps_json(comparisons.to_json(matrix)),
    }
    for entry in entries:
        doc = report.scorecard_report(entry.card, entry.items, title=entry.name, submission=entry.submission,
                                      robust=entry.robustness)
        files[f"reports/{entry.name}.md"] = doc.markdown
        files[f"reports/{entry.name}.html"] = doc.html
    for stem, doc in matrix.reports.items():
        files[f"{stem}.md"] = doc.markdown
        files[f"{stem}.html"] = doc.html
    return {k: v.encode("utf-8") for k, v in sorted(files.items())}


def check_root(root: str | Path) -> Path:
    """``root`` (``--root``: the directory holding submissions/ and leaderboards/) is an existing directory: a
    mistyped root is not an empty store, to build a board from or to start a new store in."""
    root = Path(root)
    if not root.is_dir():
        raise EtbenchError(f"--root: {root} is not a directory")
    return root


def build(root: Path = Path("."), out_dir: Optional[Path] = None, include_paper: bool = True,
          notes: Optional[list[str]] = None) -> list[Path]:
    """Regenerate ``leaderboards/`` from ``submissions/results/`` under ``root``. Incomplete or corrupt
    stored entries are skipped and described in ``notes``."""
    root = check_root(root)
    out_dir = root / LEADERBOARD_DIR if out_dir is None else Path(out_dir)
    check_output_dir(out_dir, "--out" if out_dir != root / LEADERBOARD_DIR else "leaderboard directory")
    problems: list[str] = []
    with locked(root):
        entries = load_entries(root / RESULTS_SUBDIR, problems=problems)
        files = render(entries, include_paper)
        remove_own_temporaries(out_dir, files)
        with Transaction() as txn:
            written = write_tree(out_dir, files, txn)
    if notes is not None:
        notes.extend(problems)
    return written


def locked(root: Path):
    """The store's lock, and stale temporaries of killed writers removed (no-op for a read-only store)."""
    results = Path(root) / RESULTS_SUBDIR
    lock_dir = Path(root) / "submissions"
    if not lock_dir.is_dir() or not os.access(lock_dir, os.W_OK):  # no store here, or nobody can write it
        return contextlib.nullcontext()
    return _CleaningLock(Path(root), results)


class _CleaningLock:
    def __init__(self, root: Path, results: Path) -> None:
        self._lock, self._results = store_lock(root), results

    def __enter__(self) -> "_CleaningLock":
        self._lock.__enter__()
        remove_stale_temporaries(self._results)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)
