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


def test_model_loading_is_announced_with_its_time(tmp_path):
    """Loading was silent for 20-40 s on the tiny models: a line names the model (with its size against the free
    memory) before the load, and one gives its time after; --no-progress hides both, and stdout stays results."""
    import re

    toy.save_toy_model(tmp_path / "m")
    shown = etbench("accuracy", "--model", str(tmp_path / "m"), "--n-boxes", "3", "--n", "10")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^loading .*m: .* B parameters, .* GB free on this machine \.\.\.$", shown.stderr, re.M)
    assert re.search(r"^loaded .*m in \d+\.\d s$", shown.stderr, re.M)
    assert not re.search(r"^load(ing|ed) ", shown.stdout, re.M)
    hidden = etbench("accuracy", "--model", str(tmp_path / "m"), "--n-boxes", "3", "--n", "10", "--no-progress")
    assert hidden.returncode == 0 and not re.search(r"^load(ing|ed) ", hidden.stderr, re.M)
