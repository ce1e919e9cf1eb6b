"""Forgeries of the committed tiny-ft card that the seeded fuzzer (test_submit_fuzz.py) does not draw: whole
entries deleted together with their ``absent`` line, and a circuit's heads reordered within a group (the same
set, so every number but the equal-size overlap stays). Each goes through ``submissions.check_card``, every check
``etbench submit`` runs on a card and its rows (review of issues 25/26, branch review-s8)."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from etbench.core.errors import EtbenchError
from etbench.metrics import headline
from etbench.metrics.overlap import equal_size_overlap
from etbench.publish import submissions
from etbench.schema import scorecard as sc

REPO = Path(__file__).resolve().parents[2]
CARD = REPO / "submissions" / "results" / "tiny-ft"
SUBMISSION = REPO / "submissions" / "tiny-ft.yaml"


@pytest.fixture(scope="module")
def genuine():
    data = json.loads((CARD / "scorecard.json").read_text(encoding="utf-8"))
    items = sc.from_dict(data).items(CARD / "scorecard.json")
    sub = submissions.parse(SUBMISSION)
    submissions.check_models(sub)
    memo: dict = {}
    submissions.check_card(sub, sc.from_dict(copy.deepcopy(data)), items, "genuine", memo)  # the control
    return data, items, sub, memo


def _check(genuine, card: dict) -> None:
    _, items, sub, memo = genuine
    card["config_hash"] = sc.config_hash(card["config"])  # a careful forger
    submissions.check_card(sub, sc.from_dict(card), items, "forged", memo)


@pytest.mark.parametrize("which", ["one", "all"])
def test_a_semantics_check_deleted_with_its_absent_line_is_refused(genuine, which):
    """The semantics check runs on both models for every DCM selection of the base circuit; deleting an entry
    (a failed check, say) and its ``absent`` line left no trace and was accepted."""
    card = copy.deepcopy(genuine[0])
    gone = card["semantics"][:1] if which == "one" else card["semantics"]
    wheres = {f"semantics check accuracy ({s['heads_of']} heads into {s['model']}, {s['group']}, {s['desideratum']})"
              for s in gone}
    card["semantics"] = [s for s in card["semantics"] if s not in gone]
    card["absent"] = [a for a in card["absent"] if a["where"] not in wheres]
    with pytest.raises(EtbenchError, match=r"semantics check \(base heads into .*missing"):
        _check(genuine, card)


def _reorder_ft_circuit(card: dict) -> float:
    """Sort each group of the ft circuit so the base circuit's heads come first (the same set), recompute the
    equal-size overlap rows as a careful forger would, and return the forged mechanism reuse."""
    base, ft = (next(c["heads"] for c in card["circuits"] if c["name"] == w) for w in ("base", "ft"))
    for g, heads in ft.items():
        order = [tuple(h) for h in base.get(g, [])]
        heads.sort(key=lambda h: order.index(tuple(h)) if tuple(h) in order else len(order))
    parsed = sc.from_dict(card)
    pool = parsed.base.n_layers * parsed.base.n_heads
    top = {o.group: json.loads(json.dumps(asdict(o))) for o in equal_size_overlap(base, ft, pool)}
    card["overlap"] = [top[o["group"]] if o["heads"] == "circuit-top" else o for o in card["overlap"]]
    return headline.mechanism_reuse(next(o for o in sc.from_dict(card).overlap
                                         if o.heads == "circuit-top" and o.group == "all")).value


@pytest.mark.xfail(strict=True, reason="open: a circuit's ranking within a group is trusted (nothing on a card "
                                       "without edges re-derives it) and the headline mechanism reuse follows it")
def test_reordering_the_ft_circuit_within_its_groups_cannot_raise_mechanism_reuse(genuine):
    """The same heads in each group, the base circuit's heads first: faithfulness, the as-found overlap, CMAP and
    DCM do not move, but the equal-size cut (mechanism reuse, a headline column) rises from +0.52 to +0.74. On a
    card without the edges section (schema 3, as most of the board): see the next test for one with edges."""
    card = copy.deepcopy(genuine[0])
    card["edges"], card["schema_version"] = None, 3
    items = [r for r in genuine[1] if r.get("measure") != "edge_effect"]
    assert _reorder_ft_circuit(card) > 0.7  # the forgery does what it says (genuine: 0.52)
    card["config_hash"] = sc.config_hash(card["config"])
    with pytest.raises(EtbenchError):
        submissions.check_card(genuine[2], sc.from_dict(card), items, "forged", None)


def test_reordering_the_ft_circuit_is_refused_on_a_card_with_edges(genuine):
    """The edges' node set is each group's top heads of both circuits in their ranking, re-derived from the
    circuits on submit: a reordered circuit no longer names the nodes its edge rows were measured on."""
    card = copy.deepcopy(genuine[0])
    if card.get("edges") is None:
        pytest.fail("the committed tiny-ft card carries no edges (etbench submit --add-edges)")
    assert _reorder_ft_circuit(card) > 0.7
    with pytest.raises(EtbenchError, match=r"edges nodes: are not the circuits' top"):
        _check(genuine, card)


HIDDEN = {
    # mechanism reuse (a headline column) read "—", "undefined: no equal-size circuit overlap in the scorecard"
    "equal-size overlap rows": (lambda c: c.update(overlap=[o for o in c["overlap"] if o["heads"] != "circuit-top"]),
                                r"equal-size head overlap \(.*missing"),
    "equal-size overlap, all groups": (lambda c: c.update(overlap=[o for o in c["overlap"] if (o["heads"], o["group"])
                                                                   != ("circuit-top", "all")]),
                                       r"equal-size head overlap \(all\): missing"),
    "as-found overlap rows": (lambda c: c.update(overlap=[o for o in c["overlap"] if o["heads"] != "circuit"]),
                              r"head overlap \(.*missing"),
    # gain explained (a headline column) read "—": the full circuit's CMAP row, or the whole section, deleted
    "CMAP full row": (lambda c: c.update(cmap=[x for x in c["cmap"] if (x["variant"], x["group"], x["heads"])
                                               != ("output", "full", "dcm")]), r"CMAP output full \(dcm heads\): missing"),
    "CMAP section": (lambda c: c.update(cmap=[]), r"CMAP .*: missing"),
    "DCM overlap rows": (lambda c: c.update(overlap=[o for o in c["overlap"] if o["heads"] != "dcm"]),
                         r"DCM head overlap: missing"),
}


@pytest.mark.parametrize("what", sorted(HIDDEN))
def test_a_number_the_card_carries_the_inputs_of_cannot_be_deleted(genuine, what):
    """Each was accepted: the number was gone without an ``absent`` line, and the board showed the headline as
    undefined. Only the three kinds of ``rederive.ABSENTABLE`` may be left out."""
    edit, message = HIDDEN[what]
    card = copy.deepcopy(genuine[0])
    edit(card)
    with pytest.raises(EtbenchError, match=message):
        _check(genuine, card)


#: A committed card carrying the edges section (scorecard schema 4), added with ``etbench submit --add-edges``.
EDGE_CARD = REPO / "submissions" / "results" / "tiny-null"


def _b_to_a(card: dict) -> dict:
    return next(r for r in card["edges"]["rows"] if r["type"] == "B->A")


#: Forgeries of the edges section: the known answer's figure moved, the section dropped (its rows kept), or the
#: section dropped with its rows (a card of schema 4 whose preset scores edges).
EDGE_FORGERIES = {
    "rewiring at its chance level": (lambda c, items: (_b_to_a(c)["rewiring"].update(
        value=1 - _b_to_a(c)["chance"]["base_in_ft"]), items)[1], r"edges \(B->A\) rewiring: value"),
    "rewiring CI narrowed": (lambda c, items: (_b_to_a(c)["rewiring"].update(high=_b_to_a(c)["rewiring"]["value"]),
                                               items)[1], r"edges \(B->A\) rewiring: high"),
    "section dropped, rows kept": (lambda c, items: (c.update(edges=None), items)[1],
                                   r"edges: missing \(the items file carries edge_effect rows\)"),
    "section and rows dropped, preset scores edges": (
        lambda c, items: (c.update(edges=None), c["config"]["preset"].update(edge_types=["C->B", "B->A", "A->logits"],
                                                                             edge_n=32),
                          [r for r in items if r.get("measure") != "edge_effect"])[2],
        r"edges: missing \(the card's preset scores edges\)"),
}


@pytest.fixture(scope="module")
def edge_card():
    if not (EDGE_CARD / "scorecard.json").is_file():
        pytest.skip("tiny-null is not on the leaderboard")
    data = json.loads((EDGE_CARD / "scorecard.json").read_text(encoding="utf-8"))
    if data.get("edges") is None:
        pytest.fail("the committed tiny-null card carries no edges (etbench submit --add-edges)")
    items = sc.from_dict(data).items(EDGE_CARD / "scorecard.json")
    sub = submissions.parse(REPO / "submissions" / "tiny-null.yaml")
    submissions.check_models(sub)
    memo: dict = {}
    submissions.check_card(sub, sc.from_dict(copy.deepcopy(data)), items, "genuine", memo)  # the control
    return data, items, sub, memo


@pytest.mark.parametrize("what", sorted(EDGE_FORGERIES))
def test_a_forged_edges_section_is_refused(edge_card, what):
    """``submit`` re-derives every number of the edges section from its ``edge_effect`` rows (docs/method.md §13)."""
    data, items, sub, memo = edge_card
    edit, message = EDGE_FORGERIES[what]
    card = copy.deepcopy(data)
    rows = edit(card, list(items))
    card["config_hash"] = sc.config_hash(card["config"])  # a careful forger
    with pytest.raises(EtbenchError, match=message):
        submissions.check_card(sub, sc.from_dict(card), rows, "forged", memo if rows == items else None)


@pytest.mark.parametrize("yaml_file", sorted(p.name for p in (REPO / "submissions").glob("*.yaml")))
def test_every_committed_card_passes_submit_check(yaml_file):
    """``leaderboard build`` publishes the store as it is (a card's bytes are checked against submission.json's
    sha256, which an editor of the store can rewrite too): every committed card must still pass every check of
    ``etbench submit --check``, including the sections required since review-s8."""
    sub = submissions.validate(REPO / "submissions" / yaml_file)
    assert sub.name == yaml_file.removesuffix(".yaml")
