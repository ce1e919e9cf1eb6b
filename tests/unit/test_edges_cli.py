"""``etbench edges``: bad input is one line before any model loads, and nothing is written."""

from __future__ import annotations

import pytest

from support.commands import assert_one_line_error, etbench

MODELS = ["--base", "/no/such/base", "--ft", "/no/such/ft"]


@pytest.mark.parametrize("args, fragment", [
    ([*MODELS, "--circuit-base", "tiny-base", "--circuit-ft", "tiny-base", "--top-fraction", "1.5"], "top fraction"),
    ([*MODELS, "--circuit-base", "tiny-base", "--circuit-ft", "tiny-base", "--type", "A->B"], "unknown edge type"),
    ([*MODELS, "--circuit-base", "tiny-base", "--circuit-ft", "tiny-base", "--n", "1"], "at least 2 prompts"),
    ([*MODELS, "--circuit-base", "tiny-base", "--circuit-ft", "no/such/circuit.json"], "no/such/circuit.json"),
    ([*MODELS, "--circuit-base", "tiny-base", "--circuit-ft", "tiny-base"], "/no/such/base"),
])
def test_bad_input_is_one_line(args, fragment, tmp_path):
    assert_one_line_error(etbench("edges", *args, "--out", "o", cwd=tmp_path), fragment)
    assert not any(tmp_path.iterdir())


def test_a_file_edges_did_not_write_is_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "edge_comparison.json").write_text("mine")
    result = etbench("edges", "--base", "tiny-base", "--ft", "tiny-null", "--circuit-base", "tiny-base",
                     "--circuit-ft", "tiny-base", "--out", "o", cwd=tmp_path)
    assert_one_line_error(result, "was not written by `etbench edges`")
    assert (tmp_path / "o" / "edge_comparison.json").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["edge_comparison.json"]
