"""The etbench command: outputs, and bad input as one line + non-zero exit (never a traceback)."""

import json
from pathlib import Path

import pytest

import etbench as etbench_package
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


def test_a_model_directory_whose_config_is_not_an_object_is_one_line(tmp_path):
    """``accuracy --model DIR`` and ``score --base DIR`` with a JSON list as DIR/config.json were a TypeError
    traceback from transformers; now one line naming the file, before any model loads, nothing written."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("[1, 2]\n")
    for args in (["accuracy", "--model", "model"], ["score", "--base", "model", "--out", "out"]):
        assert_one_line_error(etbench(*args, cwd=tmp_path), "model/config.json: not a JSON object")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_reuse_stages_refuses_a_directory_with_no_stage_files(tmp_path):
    """Review: ``--reuse-stages`` took an empty directory (or a mistyped one holding no stage), reusing nothing."""
    from etbench.scoring.pipeline import stage_sources
    from etbench.scoring.stages import StageCache

    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "stages").mkdir(parents=True)
    (tmp_path / "run" / "stages" / "notes.json").write_text('{"key": "k", "result": 1}\n')  # no checksum
    for given, named in (("empty", "empty"), ("run", "run/stages")):
        result = etbench("score", "--out", "o", "--reuse-stages", given, cwd=tmp_path)
        assert_one_line_error(result, f"--reuse-stages: {named} holds no stage files")
    assert not (tmp_path / "o").exists()
    StageCache(tmp_path / "run" / "stages").run("accuracy_base", {"n": 1}, lambda: 0.5)
    assert stage_sources([tmp_path / "run"]) == [tmp_path / "run" / "stages"]


def test_tasks_path_points_at_the_task_yamls():
    result = etbench("tasks-path")
    assert (Path(result.stdout.strip()) / "entity_tracking" / "entity_tracking_7boxes.yaml").exists()


ROOT = Path(__file__).resolve().parents[2]


def test_version_and_short_help():
    import tomllib

    version = etbench("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"etbench {etbench_package.__version__}"
    assert etbench_package.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for args in (["-h"], ["models", "-h"], ["models", "export", "-h"], ["score", "-h"]):
        result = etbench(*args)
        assert result.returncode == 0 and "Usage: etbench" in result.stdout, (args, result.stderr)


def test_flags_are_shown_without_a_value_type():
    """typer printed ``<bool>`` beside on/off flags (``--no-progress``, ``--help``), as if they took a value."""
    for command in ("accuracy", "score", "models list"):
        result = etbench(*command.split(), "--help")
        assert result.returncode == 0
        assert ("--no-progress" if command != "models list" else "--wide") in result.stdout
        assert "<bool>" not in result.stdout and "--help" in result.stdout


def test_models_list_fits_100_columns_and_wide_has_every_column():
    narrow, wide = etbench("models", "list"), etbench("models", "list", "--wide")
    assert narrow.returncode == wide.returncode == 0
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 100
    assert max(len(line) for line in wide.stdout.splitlines()) > 100 and "source" in wide.stdout.splitlines()[0]


def test_compare_with_one_unknown_side_names_that_side(tmp_path):
    """``compare tiny-ft nosuch`` suggested ``etbench score --base tiny-ft --ft nosuch``: tiny-ft is a stored row,
    so the message is about ``nosuch`` alone, and lists the stored names."""
    result = etbench("compare", "tiny-ft", "nosuch", cwd=ROOT)
    assert_one_line_error(result, "no scorecard for 'nosuch'")
    assert "--base tiny-ft" not in result.stderr and "tiny-goat" in result.stderr
    # two refs that are no stored row: the suggestion to score the pair stays
    assert_one_line_error(etbench("compare", "some-base", "some-ft", cwd=ROOT), "etbench score --base some-base")


def test_compare_across_bases_says_what_stays_comparable():
    result = etbench("compare", "tiny-ft", "gemma-ft", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    note = next(line for line in result.stdout.splitlines() if "different bases" in line)
    assert "tiny-base and gemma-base" in note and "llama and gemma3_text" in note
    assert "Accuracy is compared on the same prompts" in note
    same_base = etbench("compare", "tiny-ft", "tiny-goat", cwd=ROOT)
    assert same_base.returncode == 0 and "different bases" not in same_base.stdout


def test_report_is_written_beside_the_scorecard_not_in_the_current_directory(tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ROOT / "submissions" / "results" / "tiny-null", run)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = etbench("report", str(run), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert (run / "report.md").is_file() and (run / "report.html").is_file() and not any(cwd.iterdir())
    out = tmp_path / "out"
    assert etbench("report", str(run), "--out", str(out), cwd=cwd).returncode == 0
    assert (out / "report.md").read_bytes() == (run / "report.md").read_bytes()


def test_report_in_a_score_run_directory_rewrites_the_report_score_wrote(tmp_path):
    """`etbench score` writes report.md/html beside its scorecard; `etbench report RUN` there writes the same
    bytes (allowed by the ownership rule), while a user's own report.md there is still refused."""
    import shutil

    from etbench.core.io import claim_outputs
    from etbench.publish import report
    from etbench.schema import scorecard as sc
    from etbench.scoring.pipeline import SCORE_REPORT_OUTPUTS, SCORE_WRITER

    run = tmp_path / "run"
    # a score run's files only (a stored row also holds robustness.json, which the report would add)
    shutil.copytree(ROOT / "submissions" / "results" / "tiny-null", run,
                    ignore=shutil.ignore_patterns("robustness.json", ".etbench-robustness-manifest.json"))
    card = sc.load(run / "scorecard.json")
    claim_outputs(run, SCORE_REPORT_OUTPUTS, SCORE_WRITER)  # as etbench.score does
    report.write_doc(report.scorecard_report(card, sc.load_items(run / "scorecard.json", card)), run)
    written = (run / "report.html").read_bytes()
    result = etbench("report", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run / "report.html").read_bytes() == written
    (run / "report.md").write_text("my notes")
    (run / SCORE_WRITER.manifest).unlink()
    (run / report.REPORT_WRITER.manifest).unlink()
    assert_one_line_error(etbench("report", str(run), cwd=tmp_path), "report.md exists and was not written")
    assert (run / "report.md").read_text() == "my notes"


def test_export_refuses_a_directory_it_did_not_write_before_loading(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    assert_one_line_error(etbench("models", "export", "tiny-base", str(mine)), "notes.txt exists and was not written")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert_one_line_error(etbench("models", "export", "tiny-base", str(tmp_path / "file")), "not a directory")
    assert_one_line_error(etbench("models", "export", "no-such-alias", str(tmp_path / "new")), "no-such-alias")
    assert_one_line_error(etbench("models", "export", "tiny-base", str(tmp_path / "new"), "--dtype", "int8"),
                          "dtype")
    assert not (tmp_path / "new").exists()
