"""Circuit model, file format and shipped paper circuits (discovery tests further down)."""


from __future__ import annotations

import json
import math

import pytest

from etbench.core.errors import EtbenchError
from etbench.schema.circuit import GROUP_POSITION, GROUPS, Circuit, Node, load_circuit, paper_circuit


def small_circuit(**kw) -> Circuit:
    return Circuit.from_heads({"A": [[1, 0], [0, 2]], "B": [[1, 1]], "C": [[0, 1]], "D": [[0, 0], [1, 1]]},
                              {"A": [-0.5, -0.1], "B": [-0.3], "C": [-0.2], "D": [-0.05, -0.01]},
                              model="toy", n_layers=2, n_heads=4, method="manual", parameters={"k": [1, 2]}, **kw)


def test_groups_positions_and_views():
    c = small_circuit()
    assert c.group_sizes == {"value_fetcher": 2, "position_transmitter": 1, "position_detector": 1, "structure_reader": 2}
    assert c.size == 6 and c.distinct_heads == {(1, 0), (0, 2), (1, 1), (0, 1), (0, 0)}
    assert c.heads("A") == [(1, 0), (0, 2)]  # order kept
    kept = c.kept()
    assert kept["last"] == {(1, 0), (0, 2), (1, 1)} and kept["query_label"] == {(0, 1)}
    assert kept["prev_query_label"] == {(0, 0), (1, 1)}
    assert Node("D", 1, 1) in c and Node("C", 1, 1) not in c
    assert Node("a", 0, 0).group == "value_fetcher" and Node("A", 0, 0).position_class == "last"
    assert [GROUP_POSITION[g] for g in GROUPS] == ["last", "last", "query_label", "prev_query_label"]
    assert c.top(1).group_sizes == {g: 1 for g in GROUPS}
    assert c.without([Node("A", 1, 0)]).heads("A") == [(0, 2)]


def test_json_round_trip(tmp_path):
    c = small_circuit(stats={"forward_passes": 12})
    path = c.save(tmp_path / "c.json")
    back = Circuit.load(path)
    assert back == c
    assert [n.score for n in back.nodes()] == [n.score for n in c.nodes()]
    data = json.loads(path.read_text())
    assert data["format"] == "etbench-circuit" and data["schema_version"] == 1
    assert data["model"] == {"name": "toy", "n_layers": 2, "n_heads": 4}
    assert data["method"] == {"name": "manual", "parameters": {"k": [1, 2]}}
    assert data["groups"]["structure_reader"] == {"position": "prev_query_label", "heads": [[0, 0], [1, 1]],
                                                  "scores": [-0.05, -0.01]}
    assert load_circuit(path) == c


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.update(format="other"), "not an etbench circuit"),
    (lambda d: d["groups"].update(extra={"heads": []}), "unknown groups"),
    (lambda d: d["groups"]["value_fetcher"].update(position="query_label"), "must sit at position 'last'"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[0, 1, 2]]), "[layer, head]"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[1, 0], [1, 0]], scores=None), "twice"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[5, 0], [0, 2]]), "out of range"),
    (lambda d: d["groups"]["value_fetcher"].update(heads=[[0, -1], [0, 2]]), "non-negative"),
])
def test_bad_files_give_clear_errors(tmp_path, mutate, message):
    data = small_circuit().to_dict()
    mutate(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(EtbenchError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        Circuit.load(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(err.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(EtbenchError, match="not found"):
        Circuit.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(EtbenchError, match="not valid JSON"):
        Circuit.load(tmp_path / "x.json")


def test_a_directory_given_as_a_circuit_is_named_a_directory(tmp_path):
    """Review: ``-c DIR`` said "circuit file not found" of a directory that exists."""
    with pytest.raises(EtbenchError, match=f"^circuit {tmp_path} is a directory; give a circuit JSON file$"):
        load_circuit(tmp_path)


def test_validate_against_model_shape():
    c = small_circuit()
    c.validate(2, 4)
    with pytest.raises(EtbenchError, match=r"1 layers x 4 heads.*A:L1H0"):
        c.validate(1, 4)


@pytest.mark.parametrize("name, sizes, distinct", [
    ("llama7b", (40, 7, 20, 5), 67), ("goat7b", (68, 28, 40, 39), 151), ("float7b", (68, 29, 40, 38), 154)])
def test_paper_circuits_match_the_reference(name, sizes, distinct):
    c = paper_circuit(name)
    assert tuple(c.group_sizes.values()) == sizes and len(c.distinct_heads) == distinct
    assert (c.n_layers, c.n_heads, c.method) == (32, 32, "paper")
    assert all(n.score is not None for n in c.nodes())
    if name == "llama7b":  # docs/method.md §5, in the repo's order; prominent heads of docs/method.md §3
        assert c.heads("B") == [(14, 27), (11, 23), (12, 23), (19, 12), (13, 0), (16, 2), (13, 14)]
        assert c.heads("D") == [(8, 21), (12, 23), (11, 9), (8, 12), (11, 23)]
        assert c.heads("A")[0] == (15, 13) and (21, 3) in c.heads("A") and c.heads("C")[0] == (10, 3)
        assert c.nodes("B")[0].score == pytest.approx(-0.326, abs=1e-3)
    assert load_circuit(f"paper:{name}") == c
    with pytest.raises(EtbenchError, match="does not fit"):
        c.validate(30, 9)


def test_shipped_tiny_base_circuit():
    c = load_circuit("tiny-base")
    assert (c.n_layers, c.n_heads, c.model) == (30, 9, "tiny-base") and c.size > 0
    # sized by faithfulness: grown by size of effect, so heads whose patch raises p(answer) (score > 0) are in it
    assert c.method == "attribution+path_patching" and all(math.isfinite(n.score) for n in c.nodes())
    assert c.parameters["size"] == "faithfulness" and c.parameters["growth_order"] == "magnitude"


def test_unknown_paper_circuit():
    with pytest.raises(EtbenchError, match="shipped: llama7b"):
        paper_circuit("gpt4")
