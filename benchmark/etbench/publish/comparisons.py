"""Pairwise paired comparisons among leaderboard rows that fine-tune one base model.

Rows are grouped by the base model as their scorecards record it (``base_identity``: the base weights'
revision hash, else what was loaded). Within a group every pair is compared with
``report.compare_cards`` on the items both scorecards share (the same seeded prompts when they were
scored under one protocol): 7-box accuracy difference with its paired bootstrap CI and exact McNemar
p, and the difference of full-circuit CMAP gains (paired bootstrap CI, paired permutation p). A pair
scored under different protocols, or whose base answers show that its item ids do not name the same
prompts, gets a reason instead of a number. Every p-value of the matrix is Holm-adjusted as one
family. Each compared pair links to its comparison report, rendered as ``etbench compare`` renders it.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Protocol

from etbench.core import stats
from etbench.core.errors import EtbenchError
from etbench.core.stats import format_estimate, format_p
from etbench.publish import report
from etbench.schema import scorecard as sc

SCHEMA_VERSION = 1
N_BOXES = 7
CORRECTION = "holm"
ALPHA = 0.05
#: Above this share of shared items on which the two scorecards' base answers differ, their item ids are
#: taken not to name the same prompts. One base on one prompt set answers identically item by item; a
#: few flips can come from numerics (another device), ~half of them from another prompt set.
MAX_BASE_DISAGREEMENT = 0.05
COMPARE_DIR = "reports/compare"

COMPARED = "compared"
NOT_COMPARABLE = "not comparable"
NOT_ALIGNED = "items do not align"
NO_SHARED_ITEMS = "no shared items"


class Scored(Protocol):
    """A stored leaderboard entry (``leaderboard.Entry``): a name, its scorecard and per-item rows."""

    name: str
    card: sc.Scorecard
    items: list[dict[str, Any]]


def base_identity(card: sc.Scorecard) -> str:
    """Which base model a scorecard measured against: its weights' revision hash, else what was loaded."""
    return card.base.revision or card.base.source


@dataclass
class PairedDifference:
    """``b - a`` on the items both share, its 95% CI, its test's p and the family-adjusted p."""

    difference: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int
    method: str
    test: str
    p: Optional[float]
    p_adjusted: Optional[float] = None


@dataclass
class PairCell:
    """One pair (a, b) of fine-tunes of one base; differences are b minus a."""

    a: str
    b: str
    status: str  # COMPARED, NOT_COMPARABLE, NOT_ALIGNED or NO_SHARED_ITEMS
    reason: str = ""
    accuracy: Optional[PairedDifference] = None  # 7-box accuracy
    accuracy_a: Optional[float] = None
    accuracy_b: Optional[float] = None
    cmap_full_gain: Optional[PairedDifference] = None
    base_answers_agree: Optional[int] = None
    shared_items: Optional[int] = None
    report: Optional[str] = None  # relative to the leaderboard directory

    @property
    def significant(self) -> bool:
        return any(d is not None and d.p_adjusted is not None and d.p_adjusted < ALPHA
                   for d in (self.accuracy, self.cmap_full_gain))


@dataclass
class BaseGroup:
    base: str  # the base's ref, as the first scorecard (by name) gives it
    identity: str
    members: list[str]  # entry names, sorted
    pairs: list[PairCell] = field(default_factory=list)

    def cell(self, a: str, b: str) -> PairCell:
        return next(c for c in self.pairs if (c.a, c.b) == (a, b))


@dataclass
class Matrix:
    groups: list[BaseGroup]
    alone: list[str]  # measured rows with no other row on their base
    reports: dict[str, report.Doc]  # relative path stem -> comparison report


def report_stem(a: str, b: str) -> str:
    return f"{COMPARE_DIR}/{a}__{b}"


def _difference(iv: stats.Interval, test: str, p: Optional[float]) -> PairedDifference:
    return PairedDifference(iv.value, iv.low, iv.high, iv.n, iv.method, test, p)


def compare_pair(a: Scored, b: Scored) -> tuple[PairCell, Optional[report.Comparison]]:
    """The cell of one pair and the comparison behind it (None when there is no number to show)."""
    differences = sc.protocol_differences(a.card, b.card)
    if differences:
        more = f"; and {len(differences) - 2} more" if len(differences) > 2 else ""
        return PairCell(a.name, b.name, NOT_COMPARABLE,
                        "scored under different protocols: " + "; ".join(differences[:2]) + more), None
    agree, shared = report.base_answers_agreement(a.items, b.items, N_BOXES)
    if shared == 0:
        return PairCell(a.name, b.name, NO_SHARED_ITEMS,
                        f"no {N_BOXES}-box items in both scorecards' per-item rows"), None
    if shared - agree > MAX_BASE_DISAGREEMENT * shared:
        return PairCell(a.name, b.name, NOT_ALIGNED,
                        f"the base model's answers differ on {shared - agree} of {shared} shared items: "
                        "the item ids do not name the same prompts", base_answers_agree=agree,
                        shared_items=shared), None
    try:
        comp = report.compare_cards(a.card, a.items, b.card, b.items, a.name, b.name)
    except EtbenchError as err:  # compare_cards' own checks: say why in the cell
        return PairCell(a.name, b.name, NOT_COMPARABLE, str(err)), None
    cell = PairCell(a.name, b.name, COMPARED, base_answers_agree=agree, shared_items=shared,
                    report=report_stem(a.name, b.name) + ".html")
    if agree < shared:
        cell.reason = f"the base model's answers differ on {shared - agree} of {shared} shared items"
    acc = report.accuracy_test_of(comp, N_BOXES)
    if acc is not None:
        r = acc.result
        cell.accuracy = _difference(r.difference, "exact McNemar", r.p_value)
        cell.accuracy_a, cell.accuracy_b = r.acc_a, r.acc_b
    cmap = report.gain_test_of(comp, f"{report.CMAP_GAIN_DIFFERENCE}:full")
    if cmap is not None:
        cell.cmap_full_gain = _difference(cmap.interval, cmap.test, cmap.p_value)
    return cell, comp


def pair_matrix(entries: list[Scored]) -> Matrix:
    """Every pair of entries that share a base, compared, and their p-values adjusted as one family."""
    by_base: dict[str, list[Scored]] = {}
    for e in sorted(entries, key=lambda e: e.name):
        by_base.setdefault(base_identity(e.card), []).append(e)
    groups, alone, reports = [], [], {}
    for identity, members in sorted(by_base.items(), key=lambda kv: (kv[1][0].card.base.ref, kv[0])):
        if len(members) < 2:
            alone.append(members[0].name)
            continue
        group = BaseGroup(members[0].card.base.ref, identity, [m.name for m in members])
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                cell, comp = compare_pair(a, b)
                group.pairs.append(cell)
                if comp is not None:
                    reports[report_stem(a.name, b.name)] = report.comparison_report(comp)
        groups.append(group)
    tested = [d for g in groups for c in g.pairs for d in (c.accuracy, c.cmap_full_gain)
              if d is not None and d.p is not None]
    adjusted = stats.adjust_pvalues([d.p for d in tested], CORRECTION, ALPHA).adjusted
    for d, p in zip(tested, adjusted):
        d.p_adjusted = p
    return Matrix(groups, sorted(alone), reports)


# ---------------------------------------------------------------------------------------------
# Rendering (pure: same matrix, same bytes)
# ---------------------------------------------------------------------------------------------

FAMILY_NOTE = (f"Differences are row minus column on the items both scorecards share (95% paired bootstrap CI). "
               f"p: exact McNemar on {N_BOXES}-box accuracy, paired permutation on the CMAP gain difference; "
               f"every p-value of the matrix is Holm-adjusted as one family (bold: adjusted p < {ALPHA}). "
               "Each comparison report adjusts only its own tests, so its Holm column differs from the matrix's.")


def to_json(matrix: Matrix) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark_version": sc.BENCHMARK_VERSION,
        "n_boxes": N_BOXES,
        "correction": CORRECTION,
        "alpha": ALPHA,
        "family": "every p-value in this file (accuracy and CMAP gain differences of every pair)",
        "direction": "b minus a",
        "groups": [asdict(g) for g in matrix.groups],
        "alone_on_their_base": matrix.alone,
    }


def _diff_text(d: Optional[PairedDifference]) -> str:
    if d is None or d.difference is None:
        return "—"
    return format_estimate(d.difference, d.low, d.high, signed=True)


def _p_text(d: Optional[PairedDifference]) -> str:
    if d is None or d.p is None:
        return ""
    return f"p {format_p(d.p)}, Holm {format_p(d.p_adjusted)}"


def _cell_lines(cell: PairCell) -> list[tuple[str, str]]:
    """(label, text) lines of a cell."""
    if cell.status != COMPARED:
        return [(cell.status, cell.reason)]
    lines = [("Δacc", f"{_diff_text(cell.accuracy)} {_p_text(cell.accuracy)}".strip())]
    if cell.cmap_full_gain is not None:
        lines.append(("ΔCMAP", f"{_diff_text(cell.cmap_full_gain)} {_p_text(cell.cmap_full_gain)}".strip()))
    if cell.reason:
        lines.append(("note", cell.reason))
    return lines


def _lower_triangle(group: BaseGroup):
    """(row, [(column, cell or None)]) with the cell of (column, row) below the diagonal: row minus column."""
    for i, row in enumerate(group.members[1:], start=1):
        yield row, [(col, group.cell(col, row)) for col in group.members[:i]]


def render_markdown(matrix: Matrix) -> list[str]:
    if not matrix.groups:
        return []
    lines = ["## Pairwise comparisons among fine-tunes of one base", "", FAMILY_NOTE, ""]
    for group in matrix.groups:
        cols = group.members[:-1]
        lines += [f"### Fine-tunes of {group.base}", "", "| row − column | " + " | ".join(cols) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for row, cells in _lower_triangle(group):
            out = []
            for _, cell in cells:
                text = "<br>".join(f"{k}: {v}" for k, v in _cell_lines(cell)).replace("|", "\\|")
                if cell.report:
                    text = f"[{text}]({cell.report.removesuffix('.html')}.md)"
                out.append(f"**{text}**" if cell.significant else text)
            out += [""] * (len(cols) - len(cells))
            lines.append(f"| {row} | " + " | ".join(out) + " |")
        lines.append("")
    return lines


def render_html(matrix: Matrix) -> str:
    if not matrix.groups:
        return ""
    esc = html.escape
    parts = ["<h2>Pairwise comparisons among fine-tunes of one base</h2>", f"<p>{esc(FAMILY_NOTE)}</p>"]
    for k, group in enumerate(matrix.groups):
        cols = group.members[:-1]
        head = "<th>row − column</th>" + "".join(f'<th scope="col">{esc(c)}</th>' for c in cols)
        body = []
        for row, cells in _lower_triangle(group):
            tds = []
            for col, cell in cells:
                lines = "<br>".join(f'<span class="k">{esc(label)}</span> {esc(text)}'
                                    for label, text in _cell_lines(cell))
                if cell.report:
                    lines = f'<a href="{esc(cell.report)}">{lines}</a>'
                cls = "pair significant" if cell.significant else "pair"
                tds.append(f'<td class="{cls}" data-a="{esc(col)}" data-b="{esc(row)}" '
                           f'data-status="{esc(cell.status)}">{lines}</td>')
            tds += ['<td class="empty"></td>'] * (len(cols) - len(cells))
            body.append(f'<tr><th scope="row">{esc(row)}</th>{"".join(tds)}</tr>')
        parts += [f"<h3>Fine-tunes of {esc(group.base)}</h3>",
                  f'<table class="matrix" id="matrix-{k}" data-base="{esc(group.base)}"><thead><tr>{head}</tr>'
                  f'</thead><tbody>{"".join(body)}</tbody></table>']
    return "\n".join(parts)
