"""The etbench command: outputs, and bad input as one line + non-zero exit (never a traceback)."""

import json

import pytest

from etbench.task import prompts as data
from support.commands import assert_one_line_error, etbench


def test_data_generate_reproduces_the_template(tmp_path):
    out = tmp_path / "d.jsonl"
    result = etbench("data", "generate", "--n-boxes", "7", "--seed", "0", "--n", "700", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 700 and rows[0] == data.generate(7, 1, 0)[0].to_paper_record(0)
    assert rows[699]["sample_id"] == 99 and rows[699]["sentence"].endswith(".")
    stdout = etbench("data", "generate", "--n", "3", "--format", "etbench")
    assert [json.loads(line)["prompt"] for line in stdout.stdout.splitlines()] == [e.prompt for e in data.generate(7, 3)]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["data", "generate", "--n-boxes", "27"], "between 2 and 26"),
        (["data", "generate", "--format", "xml"], "--format"),
        (["accuracy", "--model", "/no/such/model"], "/no/such/model"),
        (["accuracy", "--model", "./", "--n-boxes", "30"], "between 2 and 26"),
        # refused before the model is resolved or loaded (a 7B load is minutes)
        (["circuit", "discover", "--model", "/no/such/model", "--out", "c.json", "--size", "faithfulnes"],
         "size rule"),
        (["circuit", "discover", "--model", "/no/such/model", "--out", "c.json", "--size", "faithfulness",
          "--target", "1.5"], "target fraction"),
        (["circuit", "discover", "--model", "/no/such/model", "--out", "c.json", "--size", "faithfulness",
          "--target", "nan"], "target fraction"),
        # usage errors are the same one line, not typer's framed multi-line box
        (["compare"], "Missing argument 'a'"),
        (["compare", "a", "b", "--correction"], "'--correction' requires an argument"),
        (["leaderboard", "build", "--bogus"], "No such option: --bogus"),
        (["validate", "x.yaml"], "No such command 'validate'"),
        (["data", "generate", "--n", "abc"], "Invalid value for '--n'"),
        # refused before a model loads, and nothing written to --out
        (["score", "--out", "o", "--reuse-stages", "no/such/run"], "--reuse-stages: no/such/run is not a directory"),
    ],
)
def test_bad_input_is_one_clear_line(args, fragment, tmp_path):
    assert_one_line_error(etbench(*args, cwd=tmp_path), fragment)
    assert not any(tmp_path.iterdir())


def test_tasks_path_points_at_the_task_yamls():
    result = etbench("tasks-path")
    from pathlib import Path

    assert (Path(result.stdout.strip()) / "entity_tracking" / "entity_tracking_7boxes.yaml").exists()
