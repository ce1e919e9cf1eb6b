"""The DCM head overlap over several seeds, re-derived by ``etbench submit`` from a card's per-seed selections.

The cards are planted: hand-made DCM selections whose overlap per seed is known, so the control (a genuine
card is accepted) rests on values checked here by hand, not only on scoring and submit agreeing."""

from __future__ import annotations

import copy

import pytest

from etbench.core.errors import EtbenchError
from etbench.core.stats import mib_ci, proportion_ci, ratio_of_sums_ci, to_estimate
from etbench.metrics.overlap import dcm_overlap, dcm_seed_runs
from etbench.publish.rederive import rederive
from etbench.schema import scorecard as sc

SEEDS = [0, 1, 2]
#: (circuit, seed) -> value_fetcher object_value heads, position_detector positional heads
PLANTED = {
    ("base", 0): ([[1, 0], [2, 0], [3, 0], [4, 0]], [[5, 0], [6, 0]]),
    ("base", 1): ([[1, 0], [2, 0], [3, 0], [4, 0]], [[5, 0]]),
    ("base", 2): ([[1, 0], [2, 0]], [[5, 0], [6, 0]]),
    ("ft", 0): ([[1, 0], [2, 0], [3, 0], [4, 0]], [[5, 0], [6, 0]]),  # A 4/4, C 2/2
    ("ft", 1): ([[1, 0], [2, 0], [9, 0]], [[7, 0]]),  # A 2/4, C 0/1
    ("ft", 2): ([[1, 0], [9, 0]], [[5, 0]]),  # A 1/2, C 1/2
}
#: value_fetcher base_in_ft per seed pair, by hand from PLANTED: the card's value is their mean
VALUE_FETCHER_PER_SEED = [1.0, 0.5, 0.5]
#: all groups, distinct heads: seed 0 6/6; seed 1 base {1,2,3,4,5}, ft {1,2,9,7}: 2/5; seed 2 base {1,2,5,6}, ft {1,9,5}: 2/4
ALL_PER_SEED = [1.0, 0.4, 0.5]


def _selections(planted=PLANTED) -> list[sc.DcmSelection]:
    return [sc.DcmSelection(w, s, group, desideratum, heads)
            for (w, s), (a, c) in planted.items()
            for group, desideratum, heads in (("value_fetcher", "object_value", a),
                                              ("position_detector", "positional", c))]


def _dcm_scores_and_items(selections: list[sc.DcmSelection]) -> tuple[list[sc.DcmScore], list[dict]]:
    """The first seed's DCM scores (what ``card.dcm`` holds) and their test rows."""
    scores, items = [], []
    for x in selections:
        if x.seed != SEEDS[0]:
            continue
        flags = [i % 3 != 0 for i in range(12)]
        items += [{"measure": "dcm_test", "circuit": x.circuit, "group": x.group, "desideratum": x.desideratum,
                   "item": i, "correct": f} for i, f in enumerate(flags)]
        scores.append(sc.DcmScore(x.circuit, x.group, x.desideratum, x.selected_heads,
                                  to_estimate(proportion_ci(sum(flags), len(flags)))))
    return scores, items


def _card(seeds=SEEDS, planted=PLANTED, keep_selections: bool = True) -> tuple[sc.Scorecard, list[dict]]:
    """A card as scoring assembles it: the overlap computed over the seeds from the per-seed selections."""
    planted = {k: v for k, v in planted.items() if k[1] in seeds}
    selections = _selections(planted)
    dcm, items = _dcm_scores_and_items(selections)
    model = sc.ModelCard("m", "m", "llama", 8, 4)
    config = {"seed": 0, "preset": {"name": "planted", "dcm_seeds": list(seeds), "edge_types": []}}  # scores no edges
    card = sc.Scorecard(base=model, ft=model, config=config, config_hash=sc.config_hash(config),
                        provenance=sc.Provenance("0", sc.BENCHMARK_VERSION, {}, "cpu", "float32"),
                        overlap=dcm_overlap(*dcm_seed_runs(selections, seeds), seed=0), dcm=dcm,
                        dcm_selections=selections if keep_selections else None)
    return sc.from_dict(sc.to_dict(card)), items  # through JSON's shape, as submit reads it


def _overlap(card: sc.Scorecard, group: str) -> sc.OverlapScore:
    return next(o for o in card.overlap if o.heads == "dcm" and o.group == group)


def test_planted_multi_seed_card_re_derives_equal():
    card, items = _card()
    a, every = _overlap(card, "value_fetcher"), _overlap(card, "all")
    assert a.base_in_ft.value == pytest.approx(sum(VALUE_FETCHER_PER_SEED) / 3)
    assert every.base_in_ft.value == pytest.approx(sum(ALL_PER_SEED) / 3)
    assert a.base_in_ft.n == 3 and a.base_in_ft.low is not None  # three seeds that differ: a CI
    assert min(ALL_PER_SEED) <= every.base_in_ft.low <= every.base_in_ft.high <= max(ALL_PER_SEED)
    assert not any("DCM" in note for note in rederive(card, items))  # re-derived, not only range-checked


def test_selections_survive_the_json_round_trip():
    card, _ = _card()
    again = sc.from_dict(sc.to_dict(card))
    assert again.dcm_selections == card.dcm_selections and len(again.dcm_selections) == 12
    assert {(x.circuit, x.seed) for x in again.dcm_selections} == set(PLANTED)


def _edit_value(card):
    _overlap(card, "all").base_in_ft.value = 1.0


def _edit_ci(card):
    _overlap(card, "value_fetcher").jaccard.low = 0.0


def _edit_a_later_seed(card):
    # another seed-2 selection for the fine-tuned model, the overlap left as stated
    next(x for x in card.dcm_selections if (x.circuit, x.seed, x.group) == ("ft", 2, "value_fetcher")
         ).selected_heads = [[1, 0], [2, 0]]


def _drop_a_seed(card):
    card.dcm_selections = [x for x in card.dcm_selections if x.seed != 2]


@pytest.mark.parametrize("edit, message", [
    (_edit_value, r"DCM head overlap \(all\), base in ft: value"),
    (_edit_ci, r"DCM head overlap \(value_fetcher\), Jaccard: low"),
    (_edit_a_later_seed, r"DCM head overlap \(value_fetcher\)"),
    (_drop_a_seed, r"DCM selections \((base|ft), \w+, \w+, seed 2\): missing"),
])
def test_edited_multi_seed_card_is_refused_naming_the_field(edit, message):
    card, items = _card()
    edit(card)
    with pytest.raises(EtbenchError, match=message):
        rederive(card, items)


def test_a_selection_outside_the_seeds_or_twice_is_refused():
    card, items = _card()
    extra = copy.deepcopy(card.dcm_selections[0])
    extra.seed = 7
    with pytest.raises(EtbenchError, match=r"DCM head overlap: its DCM selections: .*seed 7"):
        rederive(sc.Scorecard(**{**card.__dict__, "dcm_selections": card.dcm_selections + [extra]}), items)
    twice = copy.deepcopy(card.dcm_selections[-1])
    with pytest.raises(EtbenchError, match=r"dcm_selections \(ft, 2, position_detector, positional\): listed twice"):
        rederive(sc.Scorecard(**{**card.__dict__, "dcm_selections": card.dcm_selections + [twice]}), items)


def test_first_seed_selections_must_be_the_dcm_scores():
    card, items = _card()
    first = next(x for x in card.dcm_selections if (x.circuit, x.seed, x.group) == ("base", 0, "value_fetcher"))
    first.selected_heads = [[1, 0]]
    with pytest.raises(EtbenchError, match=r"DCM selections \(base, value_fetcher, object_value, seed 0\)"):
        rederive(card, items)


def test_card_without_per_seed_selections_is_refused():
    """A card written before every seed's selections were kept: its DCM overlap over 3 seeds cannot be re-derived,
    so it is refused (it was range-checked, and an overlap of 0.54 [0.51, 0.58] could be published as 0.90)."""
    card, items = _card(keep_selections=False)
    assert card.dcm_selections is None
    with pytest.raises(EtbenchError, match="dcm_selections: missing: the DCM head overlap over 3 seeds"):
        rederive(card, items)
    data = sc.to_dict(_card(keep_selections=False)[0])
    del data["dcm_selections"]  # the key is absent from such cards
    assert sc.from_dict(data).dcm_selections is None


def test_one_seed_card_without_selections_re_derives_from_its_dcm_scores():
    card, items = _card(seeds=[0], keep_selections=False)
    assert not any("DCM" in n for n in rederive(card, items))
    _overlap(card, "value_fetcher").base_in_ft.value = 0.5
    with pytest.raises(EtbenchError, match=r"DCM head overlap \(value_fetcher\), base in ft"):
        rederive(card, items)


# ---------------------------------------------------------------------------------------------
# Schema 3: a sized circuit's record and the random-circuit baseline, re-derived from planted rows
# ---------------------------------------------------------------------------------------------

N_SIZING = 10
#: sizing prompts correct out of 10: the model 8, the form (every head at its positions) 6, no heads 0
SIZING_CEILINGS = {"model": 8, "form_all_heads": 6, "no_heads": 0}
#: curve points (scale, sizes, correct out of 10), by size; the empty circuit is the floor
CURVE = [(0.0, {"value_fetcher": 0, "position_transmitter": 0, "position_detector": 0, "structure_reader": 0}, 0),
         (1.0, {"value_fetcher": 2, "position_transmitter": 1, "position_detector": 1, "structure_reader": 1}, 3),
         (1.5, {"value_fetcher": 3, "position_transmitter": 2, "position_detector": 2, "structure_reader": 2}, 6),
         (2.0, {"value_fetcher": 4, "position_transmitter": 2, "position_detector": 2, "structure_reader": 2}, 7)]
#: by hand: form faithfulness 6/8 = 0.75, target 0.9 x 0.75 = 0.675; the points' faithfulness 0, 3/8, 6/8, 7/8:
#: scale 1.5 is the smallest at the target, so its sizes are chosen
TARGET = 0.9 * 0.75


def _flags(k: int, n: int = N_SIZING) -> list[bool]:
    return [i < k for i in range(n)]


def _sized_card() -> tuple[sc.Scorecard, list[dict]]:
    # a circuit of another name than base/ft: the protocol then asks for no faithfulness rows of it
    items = [{"measure": "sizing", "model": "base", "circuit": "planted", "ablation": a, "n_boxes": 7, "item": i,
              "correct": c} for a, k in SIZING_CEILINGS.items() for i, c in enumerate(_flags(k))]
    items += [{"measure": "sizing", "model": "base", "circuit": "planted", "point": p, "n_boxes": 7, "item": i,
               "correct": c} for p, (_, _, k) in enumerate(CURVE) for i, c in enumerate(_flags(k))]
    curve = [{"size": sum(sizes.values()), "sizes": sizes, "accuracy": k / 10, "faithfulness": (k / 10) / 0.8,
              "mib": (k / 10) / 0.8, "added": "double", "scale": scale} for scale, sizes, k in CURVE]
    sizing = {"target_fraction": 0.9, "target_faithfulness": TARGET, "reached": True, "chosen": CURVE[2][1],
              "strategy": "scaled-shape", "note": "", "n": N_SIZING, "mean_n": 8, "prompts": "held out",
              "form_faithfulness": 0.75, "model_accuracy": 0.8, "no_heads_accuracy": 0.0, "curve": curve}
    heads = {g: [[i, 0] for i in range(k)] for g, k in CURVE[2][1].items()}
    model = sc.ModelCard("m", "m", "llama", 8, 4)
    config = {"seed": 0, "preset": {"name": "planted", "edge_types": [], "sizing_n": N_SIZING, "mean_n": 8, "target_fraction": 0.9,
                                    "random_draws": 2}}
    card = sc.Scorecard(base=model, ft=model, config=config, config_hash=sc.config_hash(config),
                        provenance=sc.Provenance("0", sc.BENCHMARK_VERSION, {}, "cpu", "float32"),
                        circuits=[sc.CircuitSummary("planted", "m", "attribution+verify", heads, "faithfulness", sizing)])
    return sc.from_dict(sc.to_dict(card)), items


def test_planted_sizing_record_re_derives_from_its_rows():
    card, items = _sized_card()
    assert rederive(card, items) == []


@pytest.mark.parametrize("edit, message", [
    (lambda s, i: s.update(target_faithfulness=0.6), "target_faithfulness"),
    (lambda s, i: s.update(form_faithfulness=0.9), "form_faithfulness"),
    (lambda s, i: s["curve"][1].update(accuracy=0.4), "curve point 1 accuracy"),
    (lambda s, i: s["curve"][3].update(faithfulness=0.9), "curve point 3 faithfulness"),
    (lambda s, i: s.update(chosen=CURVE[3][1]), "chosen"),
    (lambda s, i: s.update(reached=False), "reached"),
    (lambda s, i: s.update(n=9), "sizing_n"),
    (lambda s, i: s.update(headline=0.99), "unknown or missing fields"),
    (lambda s, i: s["curve"].pop(), "which the curve does not have"),
    (lambda s, i: i.pop(), "sizing rows for"),
], ids=["target", "form", "point-accuracy", "point-faithfulness", "chosen", "reached", "n", "extra-key",
        "point-dropped", "row-dropped"])
def test_edited_sizing_record_is_refused_naming_the_field(edit, message):
    card, items = _sized_card()
    edit(card.circuits[0].sizing, items)
    with pytest.raises(EtbenchError, match=message):
        rederive(card, items)


def test_random_circuit_baseline_re_derives_from_every_draw():
    """Two draws of 4 items, 1 and 3 correct: mean 0.5, min 0.25, max 0.75, sd 0.354 (by hand)."""
    model = sc.ModelCard("m", "m", "llama", 8, 4)
    config = {"seed": 0, "preset": {"name": "planted", "random_draws": 2, "accuracy_boxes": [7], "edge_types": []}}
    flags = {"accuracy": [True] * 4, "circuit_accuracy": [True, True, False, False]}
    items = [{"measure": m, "model": w, "n_boxes": 7, "item": i, "correct": c, **({"circuit": "base"} if m !=
             "accuracy" else {})} for w in ("base", "ft") for m, fl in flags.items() for i, c in enumerate(fl)]
    items += [{"measure": "ceiling", "model": w, "ablation": a, "n_boxes": 7, "item": i, "correct": c}
              for w in ("base", "ft") for a, fl in (("every_head_every_position", [True] * 4),
                                                     ("form_all_heads", [True] * 4), ("no_heads", [False] * 4))
              for i, c in enumerate(fl)]
    items += [{"measure": "random_circuit", "model": w, "circuit": "base", "draw": d, "n_boxes": 7, "item": i,
               "correct": i < k} for w in ("base", "ft") for d, k in enumerate((1, 3)) for i in range(4)]
    baseline = sc.Estimate(0.5, 0.25, 0.75, 2, "random circuits, same group sizes",
                           note="low/high = min/max over draws; sd 0.354")
    acc = to_estimate(proportion_ci(4, 4))
    circ = to_estimate(proportion_ci(2, 4))
    low, high = ratio_of_sums_ci([True, True, False, False], [True] * 4, seed=0, draws=2000)
    faith = [sc.FaithfulnessScore("base", w, acc, circ, sc.Estimate(0.5, low, high, 4, ""), baseline)
             for w in ("base", "ft")]
    card = sc.Scorecard(base=model, ft=model, config=config, config_hash=sc.config_hash(config),
                        provenance=sc.Provenance("0", sc.BENCHMARK_VERSION, {}, "cpu", "float32"),
                        accuracy=[sc.AccuracyScore(w, 7, acc) for w in ("base", "ft")], faithfulness=faith)
    ceilings = planted_ceilings()
    card = sc.from_dict({**sc.to_dict(card), "ceilings": ceilings})
    assert rederive(card, items) == []
    card.faithfulness[1].random_circuit_accuracy.value = 0.625  # one item of one draw more
    with pytest.raises(EtbenchError, match="random circuit accuracy of the base circuit on ft: value"):
        rederive(card, items)


def planted_ceilings() -> list[dict]:
    """The ceilings of the planted rows, as scoring states them (every head kept: all 4 right; no heads: none)."""
    all4, none4 = [True] * 4, [False] * 4
    low, high = ratio_of_sums_ci(all4, all4, seed=0, draws=2000)
    mlow, mhigh = mib_ci(all4, all4, none4, 0)
    est = lambda k: {**vars(to_estimate(proportion_ci(k, 4)))}  # noqa: E731
    return [{"model": w, "form": "paper", "model_accuracy": est(4), "every_head_every_position": est(4),
             "form_accuracy": est(4), "no_heads_accuracy": est(0),
             "form_faithfulness": vars(sc.Estimate(1.0, low, high, 4, "paired-bootstrap ratio")),
             "form_faithfulness_mib": vars(sc.Estimate(1.0, mlow, mhigh, 4, "mib"))} for w in ("base", "ft")]
