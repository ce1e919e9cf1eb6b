"""Seeded fuzzing of ``etbench submit``'s scorecard checks (issue #26): no forged number is accepted.

Each case mutates the committed tiny-ft scorecard (``submissions/results/tiny-ft``) once: a number
anywhere on it changed (a value, an interval end, an n, a level, a head index, a seed, a sizing field...),
an entry of a section deleted or duplicated, an optional field deleted, or an estimate nulled; then,
as a careful forger would, its config hash is recomputed. The mutated card goes through every check
``submit`` runs on a card and its rows (``submissions.check_card``, the body of ``check_scorecard``).
Either the card is refused, or every number it states is the original's number under the same
identity (section entries are keyed by what they measure, not their position): a deleted entry leaves a
number absent, never a different one. The inputs the numbers are re-derived from, the items file and the
heads of the circuits and DCM selections (``_is_input``), are the trust root: an input head may change only
where every number stays what the new head gives (the items' forgeries are cases of ``test_faults.py``).
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from etbench.core.errors import EtbenchError
from etbench.publish import submissions
from etbench.publish.rederive import SECTION_KEYS
from etbench.schema import scorecard as sc

REPO = Path(__file__).resolve().parents[2]
CARD = REPO / "submissions" / "results" / "tiny-ft"
SUBMISSION = REPO / "submissions" / "tiny-ft.yaml"
N_MUTATIONS = 520
SEED = 26


def _numbers(obj: Any, path: tuple = ()) -> dict[tuple, Any]:
    """Every number of a card (a JSON dict), keyed by its identity: a section entry by ``SECTION_KEYS``'s fields,
    anything else by position."""
    out: dict[tuple, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_numbers(v, path + (k,)))
    elif isinstance(obj, list):
        keys = SECTION_KEYS.get(path[0]) if len(path) == 1 else None
        for i, v in enumerate(obj):
            key = tuple(repr(v.get(k)) for k in keys) if keys and isinstance(v, dict) else i
            if key in {p[len(path)] for p in out}:  # a duplicated entry: its numbers are stated twice
                key = (key, "again", i)
            out.update(_numbers(v, path + (key,)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[path] = obj
    elif obj is None:
        out[path] = None  # a null number (absent, or undefined) is a statement too: it must stay null
    return out


def _paths(obj: Any, path: tuple = ()) -> list[tuple]:
    """Positional paths of every number, list and dict field of ``obj``."""
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, path + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _new_number(rng: random.Random, old: Any) -> Any:
    if isinstance(old, int) and not isinstance(old, bool):
        return old + rng.choice([-2, -1, 1, 2, 7])
    if old is None:
        return rng.choice([0.0, 0.05, 0.5, 1.0])
    return rng.choice([old + rng.choice([-1, 1]) * 10 ** -rng.randint(2, 8), old * rng.uniform(0.5, 1.5),
                       rng.random(), 1.0 - old, round(old, 2)])


def mutate(card: dict[str, Any], rng: random.Random) -> str:
    """One mutation of ``card`` in place; returns what it did. Sections are drawn first (uniformly), then a
    place in them, so that the small sections (accuracy, ceilings, config) are hit as often as the large ones."""
    section = rng.choice(sorted(card))
    kind = rng.choices(["number", "delete-entry", "duplicate-entry", "delete-field", "null"], [12, 2, 2, 1, 1])[0]
    paths = [p for p in _paths(card[section], (section,))]
    if kind in ("delete-entry", "duplicate-entry"):
        lists = [p for p in paths if isinstance(_get(card, p), list) and _get(card, p)]
        if lists:
            where = rng.choice(lists)
            items = _get(card, where)
            i = rng.randrange(len(items))
            if kind == "delete-entry":
                del items[i]
            else:
                items.insert(i, copy.deepcopy(items[i]))
            return f"{kind} {where}[{i}]"
    if kind == "delete-field":
        fields = [p for p in paths if len(p) > 1 and isinstance(_get(card, p[:-1]), dict)]
        if fields:
            where = rng.choice(fields)
            del _get(card, where[:-1])[where[-1]]
            return f"delete-field {where}"
    numbers = [p for p in paths if (isinstance(_get(card, p), (int, float)) and not isinstance(_get(card, p), bool))
               or (kind == "null" and _get(card, p) is None)]
    if not numbers:
        numbers = [p for p in _paths(card) if isinstance(_get(card, p), (int, float))
                   and not isinstance(_get(card, p), bool)]
    where = rng.choice(numbers)
    old = _get(card, where)
    new = None if kind == "null" and old is not None else _new_number(rng, old)
    while new == old and new is not None:
        new = _new_number(rng, old)
    _get(card, where[:-1])[where[-1]] = new
    return f"{kind} {where}: {old!r} -> {new!r}"


@pytest.fixture(scope="module")
def genuine():
    data = json.loads((CARD / "scorecard.json").read_text(encoding="utf-8"))
    card = sc.from_dict(data)
    items = card.items(CARD / "scorecard.json")
    return data, items


def test_no_mutation_of_the_committed_card_is_accepted_with_a_forged_number(genuine):
    data, items = genuine
    memo: dict = {}
    sub = submissions.parse(SUBMISSION)
    submissions.check_models(sub)
    submissions.check_card(sub, sc.from_dict(copy.deepcopy(data)), items, "genuine", memo)  # the control
    original = _numbers(data)
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    forged = []
    for _ in range(N_MUTATIONS):
        card = copy.deepcopy(data)
        what = mutate(card, rng)
        if isinstance(card.get("config"), dict):
            card["config_hash"] = sc.config_hash(card["config"])  # a careful forger
        try:
            submissions.check_card(sub, sc.from_dict(card), items, "mutated", memo)
        except EtbenchError as err:
            assert "\n" not in str(err) and str(err).strip(), what
            outcomes["refused"] += 1
            continue
        changed = {k: v for k, v in _numbers(card).items() if k not in original or not _same(original[k], v)}
        derived = {k: v for k, v in changed.items() if not _is_input(k)}
        if derived:
            forged.append(f"{what}: accepted, states {derived}")
        elif changed:  # e.g. a fine-tuned head outside the base circuit swapped for another: the overlaps agree
            outcomes["accepted: an input head changed, every number re-derived from it as stated"] += 1
        else:
            outcomes["accepted, no number changed (an entry or number left out)"] += 1
    print(f"{N_MUTATIONS} mutations: {dict(outcomes)}, forged accepted: {len(forged)}")
    assert not forged, "\n".join(forged[:10])
    assert outcomes["refused"] >= 0.8 * N_MUTATIONS  # the fuzzer mostly changes numbers: it must reach the checks


def _is_input(key: tuple) -> bool:
    """The heads of the circuits and of every seed's DCM selection: what the card's numbers are re-derived *from*
    (found by running the models, which submit does not), like its items. A changed input head is accepted only
    when every number on the card is what that head gives (for instance a fine-tuned head outside the base circuit
    replaced by another outside it: no overlap moves)."""
    return (key[0] == "circuits" and len(key) > 2 and key[2] == "heads") or (
        key[0] in ("dcm_selections", "dcm") and len(key) > 2 and key[2] == "selected_heads")


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b
