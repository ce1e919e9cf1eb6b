"""etbench.scorecard: round trip, validation, schema version, canonical bytes."""

import json

import pytest

from etbench.core.errors import EtbenchError
from etbench.schema import scorecard as sc


def make_card() -> sc.Scorecard:
    est = sc.Estimate(0.44, 0.40, 0.48, 500, "wilson")
    return sc.Scorecard(
        base=sc.ModelCard("tiny-base", "src-a", "llama", 30, 9),
        ft=sc.ModelCard("tiny-ft", "src-b", "llama", 30, 9),
        config={"n": 500, "seed": 0},
        config_hash=sc.config_hash({"n": 500, "seed": 0}),
        provenance=sc.Provenance("0.1.0", sc.BENCHMARK_VERSION, {"torch": "2.13.0"}, "cpu", "float32"),
        accuracy=[sc.AccuracyScore("base", 7, est), sc.AccuracyScore("ft", 7, est)],
        cmap=[sc.CmapScore("output", "full", est, est, sc.Estimate(None, None, None, 500, "paired-bootstrap",
                                                                     note="ft accuracy equals base accuracy"))],
    )


def test_round_trip_through_disk_is_exact(tmp_path):
    card = make_card()
    path = sc.save(card, tmp_path, items=[{"measure": "accuracy", "model": "base", "n_boxes": 7, "item": 0,
                                                     "correct": True}])
    assert sc.load(path) == card
    assert sc.load_items(path, card)[0]["correct"] is True
    assert sc.canonical_bytes(sc.load(path)) == path.read_bytes()


def test_config_hash_is_order_independent_and_sensitive():
    assert sc.config_hash({"a": 1, "b": 2}) == sc.config_hash({"b": 2, "a": 1})
    assert sc.config_hash({"a": 1}) != sc.config_hash({"a": 2})


def test_invalid_or_foreign_scorecards_are_clear_errors(tmp_path):
    data = sc.to_dict(make_card())
    with pytest.raises(EtbenchError, match="schema version 99"):
        sc.from_dict({**data, "schema_version": 99})
    data["accuracy"][0]["model"] = "other"
    with pytest.raises(EtbenchError, match="accuracy.0.model"):
        sc.from_dict(data)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EtbenchError, match="not valid JSON"):
        sc.load(tmp_path / "bad.json")
    with pytest.raises(EtbenchError, match="no such scorecard"):
        sc.load(tmp_path / "missing.json")


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ('"card"', "str"), ("3", "int"), ("null", "NoneType")])
def test_json_that_is_not_an_object_is_not_a_scorecard(tmp_path, text, kind):
    """Review: a JSON list given as a scorecard was refused as "schema version None"."""
    (tmp_path / "scorecard.json").write_text(text)
    with pytest.raises(EtbenchError) as err:
        sc.load(tmp_path / "scorecard.json")
    assert str(err.value) == f"{tmp_path / 'scorecard.json'}: not a scorecard (a JSON object), got {kind}"


def test_json_schema_describes_the_dataclasses():
    schema = sc.json_schema()
    assert set(schema["required"]) >= {"base", "ft", "config", "config_hash", "provenance"}
    assert "Estimate" in json.dumps(schema)


# --- hostile inputs (each was a traceback or a silently wrong statistic in report/compare) ---

@pytest.mark.parametrize("version", [True, 1.0, 2.0, "2"])
def test_schema_version_must_be_an_integer(version):
    """``true == 1`` and ``2.0 == 2`` in Python: a version of another type was read as version 1 or 2."""
    with pytest.raises(EtbenchError, match="schema version"):
        sc.from_dict({**sc.to_dict(make_card()), "schema_version": version})


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    (tmp_path / "scorecard.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EtbenchError, match="nested too deeply"):
        sc.load(tmp_path / "scorecard.json")
    from etbench.core.io import read_json, read_jsonl

    with pytest.raises(EtbenchError, match="nested too deeply"):
        read_json(tmp_path / "scorecard.json")
    with pytest.raises(EtbenchError, match="nested too deeply"):
        read_jsonl(tmp_path / "scorecard.json")


def test_a_head_is_a_layer_and_head_pair():
    data = sc.to_dict(make_card())
    data["circuits"] = [{"name": "base", "found_on": "tiny-base", "method": "given",
                         "heads": {"value_fetcher": [[1]]}}]
    with pytest.raises(EtbenchError, match=r"circuits\.0\.heads\.value_fetcher"):
        sc.from_dict(data)


@pytest.mark.parametrize("row, message", [
    ({"correct": "no"}, "'correct' must be true or false"),  # bool("no") is True: counted as correct
    ({"correct": None}, "'correct' must be true or false"),
    ({"item": [1]}, "'item' must be an integer"),  # unhashable: a traceback
    ({"item": "0"}, "'item' must be an integer"),
    # a string box count matched no box count: the row silently left the report's paired tests
    ({"n_boxes": "7"}, "'n_boxes' must be an integer, got '7'"),
    ({"n_boxes": 7.0}, "'n_boxes' must be an integer"),
    ({"n_boxes": None}, "'n_boxes' must be an integer"),  # an accuracy row needs its box count
])
def test_item_rows_are_checked_when_read(tmp_path, row, message):
    card = make_card()
    good = {"measure": "accuracy", "model": "base", "n_boxes": 7, "item": 0, "correct": True}
    path = sc.save(card, tmp_path, items=[good, {**good, "item": 1, **row}])
    with pytest.raises(EtbenchError, match=message):
        sc.load_items(path, card)


@pytest.mark.parametrize("name", ["../other/items.jsonl", "/etc/passwd", ".hidden", "sub/items.jsonl"])
def test_items_file_is_a_plain_name_next_to_the_scorecard(tmp_path, name):
    card = make_card()
    path = sc.save(card, tmp_path, items=[])
    card.items_file = name
    with pytest.raises(EtbenchError, match="plain file name"):
        sc.load_items(path, card)


@pytest.mark.parametrize("boxes", ["7", 7.0, True, None])
def test_an_accuracy_entrys_box_count_is_an_integer(tmp_path, boxes):
    """pydantic's lax mode read "7" and 7.0 as 7 (True as 1): a malformed scorecard must be an error naming the
    file and the field, like every other malformed field."""
    data = sc.to_dict(make_card())
    data["accuracy"][1]["n_boxes"] = boxes
    (tmp_path / "scorecard.json").write_text(json.dumps(data))
    with pytest.raises(EtbenchError, match=r"scorecard.json: invalid scorecard: accuracy\.1\.n_boxes: must be an "
                                           "integer"):
        sc.load(tmp_path / "scorecard.json")


def test_report_of_a_card_with_a_string_box_count_is_one_error_and_writes_nothing(tmp_path):
    """``etbench report`` silently dropped the rows of a box count written as a string (scorecard or items)."""
    import shutil
    from pathlib import Path

    from support.commands import assert_one_line_error, etbench

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "scorecards" / "synthetic-ft-a"
    for case, where, field in (("card", "scorecard.json", "accuracy.0.n_boxes"), ("rows", "items.jsonl", "'n_boxes'")):
        card = tmp_path / case / "card"
        shutil.copytree(fixture, card)
        text = (card / where).read_text()
        (card / where).write_text(text.replace('"n_boxes": 3', '"n_boxes": "3"'))
        assert (card / where).read_text() != text
        result = etbench("report", str(card), "--out", str(tmp_path / case / "out"), cwd=tmp_path)
        assert_one_line_error(result, field)
        assert str(card / where) in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / case / "out").exists()
