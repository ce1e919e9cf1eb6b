"""The etbench command: outputs, and bad input as one line + non-zero exit (never a traceback)."""

import json

from etbench.models import toy
from support.commands import assert_one_line_error, etbench


def test_tokenizer_with_multi_token_objects_is_one_clear_line(tmp_path):
    tokenizer = toy.word_level_tokenizer(objects=["book", "car", "key"])
    model = toy.tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    result = etbench("accuracy", "--model", str(tmp_path / "m"), "--out", str(out), "--no-progress")
    assert_one_line_error(result, "too few objects")
    assert not out.exists()  # nothing half-written


def test_accuracy_on_a_saved_toy_model(tmp_path):
    toy.save_toy_model(tmp_path / "m")
    result = etbench("accuracy", "--model", str(tmp_path / "m"), "--n-boxes", "3", "--n", "30", "--no-progress",
                     "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "|       3 |  30 |" in result.stdout
    assert json.loads((tmp_path / "o" / "accuracy.json").read_text())["results"][0]["n"] == 30
