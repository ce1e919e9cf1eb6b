"""etbench submit: every bad submission is one clear error and changes no file (synthetic fixtures only)."""


from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etbench.core.errors import EtbenchError
from etbench.publish import leaderboard as lb
from etbench.publish import outputs, submissions
from etbench.schema import scorecard as sc
from support.submission_store import FIXTURES, GOOD, good_b, snapshot, write


def edit_card(root: Path, fn, rehash: bool = False) -> None:
    path = root / "submissions" / "cards" / "synthetic-ft-b" / "scorecard.json"
    data = json.loads(path.read_text())
    fn(data)
    if rehash:
        data["config_hash"] = sc.config_hash(data["config"])
    path.write_text(json.dumps(data))


def test_good_submission_is_ingested_and_rebuild_is_byte_identical(root):
    stored = root / "submissions" / "results" / "fixture-a"
    assert {p.name for p in stored.iterdir()} == {"scorecard.json", "items.jsonl", "submission.json"}
    meta = json.loads((stored / "submission.json").read_text())
    assert meta["model_ref"] == "synthetic/synthetic-ft-a" and meta["fine_tuning"]["method"] == "lora"
    board = json.loads((root / "leaderboards" / "leaderboard.json").read_text())
    names = [r["name"] for r in board["rows"]]
    assert names[0] == "fixture-a" and {"Llama-7B", "Vicuna-7B", "Goat-7B", "FLoat-7B"} <= set(names)
    assert (root / "leaderboards" / "reports" / "fixture-a.html").is_file()
    before = snapshot(root)
    lb.build(root)
    assert snapshot(root) == before
    res = submissions.submit(write(root, good_b(root), "b.yaml"), root=root)
    assert res.name == "fixture-b" and res.rows == 6
    assert (root / "submissions" / "results" / "fixture-b" / "scorecard.json").is_file()


BAD_YAML = [
    ("malformed", "name: [unclosed\nmodel: {", r"not valid YAML at line \d+"),
    ("not-a-mapping", "- a\n- b\n", "expected a YAML mapping"),
    ("missing-license", "\n".join(l for l in GOOD.format(name="x", ft="synthetic-ft-b").splitlines()
                                  if not l.startswith("license")), "'license' is a required property"),
    ("unknown-field", GOOD.format(name="x", ft="synthetic-ft-b") + "extra: 1\n", "unknown field"),
    ("unknown-alias", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "{hub: synthetic/synthetic-ft-b, revision: abc1234}", "{alias: no-such-model}"), "unknown alias 'no-such-model'"),
    ("hub-without-revision", GOOD.format(name="x", ft="synthetic-ft-b").replace(", revision: abc1234", ""),
     "exactly one of"),
    ("two-refs", GOOD.format(name="x", ft="synthetic-ft-b").replace("revision: abc1234", "revision: a, alias: gpt2"),
     "exactly one of"),
    ("remote-code-top", GOOD.format(name="x", ft="synthetic-ft-b") + "trust_remote_code: true\n",
     "trust_remote_code is not allowed"),
    ("remote-code-nested", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "revision: abc1234}", "revision: abc1234, trust_remote_code: false}"), r"model\.trust_remote_code"),
    ("bad-name", GOOD.format(name="../evil", ft="synthetic-ft-b"), "name: '../evil' is not allowed"),
    ("bad-method", GOOD.format(name="x", ft="synthetic-ft-b").replace("method: lora", "method: magic"),
     "fine_tuning.method"),
    ("scorecard-dotdot", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "cards/synthetic-ft-b/scorecard.json", "../outside/scorecard.json"), "leaves the submission's directory"),
    ("scorecard-absolute", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "cards/synthetic-ft-b/scorecard.json", "/etc/passwd"), "leaves the submission's directory"),
    ("scorecard-inner-dotdot", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "cards/synthetic-ft-b/scorecard.json", "cards/../../x/scorecard.json"), "leaves the submission's directory"),
    ("model-path-traversal", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "{hub: synthetic/synthetic-ft-b, revision: abc1234}", "{path: ../../model}"), r"model\.path: path '\.\./\.\./model'"),
    ("base-path-home", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "{hub: synthetic/synthetic-base, revision: def4567}", "{path: ~/model}"), r"base\.path: path '~/model'"),
    ("scorecard-missing", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "cards/synthetic-ft-b/scorecard.json", "cards/nope.json"), "does not exist"),
    ("same-model", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "{hub: synthetic/synthetic-ft-b, revision: abc1234}", "{hub: synthetic/synthetic-base, revision: def4567}"),
     "the same model"),
    ("wrong-model", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "hub: synthetic/synthetic-ft-b", "hub: synthetic/other"), "scorecard is for fine-tuned model 'synthetic-ft-b'"),
    ("duplicate-name", GOOD.format(name="fixture-a", ft="synthetic-ft-b"), "already submitted"),
    ("alias-bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "YAML aliases"),
    ("deep-nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply|not valid YAML"),
    ("null-byte-path", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "cards/synthetic-ft-b/scorecard.json", '"cards/\\0x"'), "leaves the submission's directory"),
    ("binary", b"name: \xff\xfe\x00\x01", "not UTF-8|not valid YAML"),
    # safe_load keeps the last of two equal keys: a second name silently renamed the submission
    ("duplicate-key", GOOD.format(name="x", ft="synthetic-ft-b") + "name: fixture-b\n", "duplicate key 'name'"),
    ("duplicate-nested-key", GOOD.format(name="x", ft="synthetic-ft-b").replace(
        "method: lora", "method: lora, method: full"), "duplicate key 'method'"),
]


@pytest.mark.parametrize("case,text,message", BAD_YAML, ids=[c[0] for c in BAD_YAML])
def test_bad_submission_files_are_rejected_without_changes(root, case, text, message):
    before = snapshot(root)
    with pytest.raises(EtbenchError, match=message) as info:
        submissions.submit(write(root, text), root=root)
    assert "\n" not in str(info.value)
    assert snapshot(root) == before


BAD_CARDS = [
    ("tampered-accuracy", lambda d: d["accuracy"][1]["accuracy"].update(value=0.99), False,
     "does not match its items file"),
    ("tampered-config", lambda d: d["config"].update(n=999), False, "config hash .* does not match its config"),
    ("limit", lambda d: d.update(limit=10), False, "--limit 10"),
    ("old-version", lambda d: d["provenance"].update(benchmark_version="0.9"), False, "benchmark version '0.9'"),
    ("other-preset", lambda d: d["config"].update(preset="other"), True,
     "claims preset 'quick' but the scorecard was made with 'other'"),
    ("arch-mismatch", lambda d: d["ft"].update(architecture="gpt2"), False, "architectures differ"),
    ("layers-mismatch", lambda d: d["ft"].update(n_layers=5), False, "architectures differ"),
    ("items-traversal", lambda d: d.update(items_file="../synthetic-ft-a/items.jsonl"), False, "plain file name"),
    ("items-missing", lambda d: d.update(items_file="gone.jsonl"), False, "items file gone.jsonl is missing"),
    ("schema-version", lambda d: d.update(schema_version=99), False, "schema version 99"),
    ("other-revision", lambda d: d["ft"].update(revision="fedcba9" * 5), False, "scorecard is for fine-tuned model"),
    ("other-base", lambda d: d["base"].update(ref="x", source="y"), False, "scorecard is for base model 'x'"),
    ("invalid-shape", lambda d: d["accuracy"][0].update(model="other"), False, "invalid scorecard"),
]


@pytest.mark.parametrize("case,edit,rehash,message", BAD_CARDS, ids=[c[0] for c in BAD_CARDS])
def test_bad_scorecards_are_rejected_without_changes(root, case, edit, rehash, message):
    edit_card(root, edit, rehash)
    before = snapshot(root)
    with pytest.raises(EtbenchError, match=message) as info:
        submissions.submit(write(root, good_b(root)), root=root)
    assert "\n" not in str(info.value)
    assert snapshot(root) == before


def test_preset_must_be_current(root):
    """A scorecard made under an older definition of its preset (here: another batch size, with a
    self-consistent config hash) is refused by the real preset check."""
    card_path = root / "submissions" / "cards" / "synthetic-ft-b" / "scorecard.json"
    data = json.loads(card_path.read_text())
    data["config"]["preset"]["batch_size"] = 12345
    data["config_hash"] = sc.config_hash(data["config"])
    card_path.write_text(json.dumps(data))
    before = snapshot(root)
    with pytest.raises(EtbenchError, match=r"scorecard.json: preset 'quick' has changed .*batch_size"):
        submissions.submit(write(root, good_b(root)), root=root)
    assert snapshot(root) == before


def test_check_preset_against_the_real_scoring_presets():
    from dataclasses import asdict

    from etbench.metrics.dcm import dcm_preset
    from etbench.scoring.presets import SCORE_PRESETS

    check = submissions.check_preset
    name = sorted(SCORE_PRESETS)[0]
    config = {"preset": json.loads(json.dumps(asdict(SCORE_PRESETS[name]))), "seed": 0,
              "dcm": json.loads(json.dumps(dcm_preset(SCORE_PRESETS[name].dcm, seed=0).to_dict()))}
    assert check(config) is None
    assert check({**config, "preset": {**config["preset"], "discovery_mode": "other"}}) is None
    with pytest.raises(EtbenchError, match="has changed"):
        check({**config, "preset": {**config["preset"], "batch_size": 12345}})
    with pytest.raises(EtbenchError, match="unknown scoring preset 'nope'"):
        check({**config, "preset": {**config["preset"], "name": "nope"}})
    with pytest.raises(EtbenchError, match="DCM settings"):
        check({**config, "dcm": {"changed": True}})


def test_symlink_escaping_the_directory_is_rejected(root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(FIXTURES / "synthetic-ft-b", outside)
    (root / "submissions" / "link").symlink_to(outside, target_is_directory=True)
    text = good_b(root).replace("cards/synthetic-ft-b/scorecard.json", "link/scorecard.json")
    before = snapshot(root)
    with pytest.raises(EtbenchError, match="outward symlinks"):
        submissions.submit(write(root, text), root=root)
    assert snapshot(root) == before


def _model_dir(path: Path, model_type: str, layers: int = 4, **extra) -> None:
    path.mkdir(parents=True)
    cfg = {"model_type": model_type, "num_hidden_layers": layers, "num_attention_heads": 4, "hidden_size": 16,
           "vocab_size": 100, **extra}
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("ft_kind,extra,message", [
    ("gpt2", {}, r"architectures differ \(model_type 'llama' vs 'gpt2'"),
    ("llama", {"auto_map": {"AutoModelForCausalLM": "x.Y"}}, "custom model code"),
])
def test_local_model_configs_are_checked(root, ft_kind, extra, message):
    models_dir = root / "submissions" / "models"
    _model_dir(models_dir / "base", "llama")
    _model_dir(models_dir / "ft", ft_kind, **extra)
    text = good_b(root).replace("{hub: synthetic/synthetic-ft-b, revision: abc1234}", "{path: models/ft}") \
        .replace("{hub: synthetic/synthetic-base, revision: def4567}", "{path: models/base}")
    before = snapshot(root)
    with pytest.raises(EtbenchError, match=message):
        submissions.submit(write(root, text), root=root)
    assert snapshot(root) == before


def test_different_tokenizers_are_rejected(root):
    models_dir = root / "submissions" / "models"
    _model_dir(models_dir / "base", "llama")
    _model_dir(models_dir / "ft", "llama")
    (models_dir / "base" / "vocab.json").write_text('{"a": 0}')
    (models_dir / "ft" / "vocab.json").write_text('{"b": 0}')
    text = good_b(root).replace("{hub: synthetic/synthetic-ft-b, revision: abc1234}", "{path: models/ft}") \
        .replace("{hub: synthetic/synthetic-base, revision: def4567}", "{path: models/base}")
    with pytest.raises(EtbenchError, match="tokenizers differ"):
        submissions.submit(write(root, text), root=root)


def test_interrupted_write_leaves_everything_unchanged(root, monkeypatch):
    before = snapshot(root)
    calls = {"n": 0}
    real = outputs._write

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 4:  # after the results and part of the leaderboard were written
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(outputs, "_write", flaky)
    with pytest.raises(OSError, match="simulated"):
        submissions.submit(write(root, good_b(root), "b.yaml"), root=root)
    assert calls["n"] == 4
    assert snapshot(root) == before
    assert not (root / "submissions" / "results" / "fixture-b").exists()


def test_replace_updates_an_existing_submission(root):
    text = GOOD.format(name="fixture-a", ft="synthetic-ft-a").replace("method: lora", "method: full")
    submissions.submit(write(root, text), root=root, replace=True)
    meta = json.loads((root / "submissions" / "results" / "fixture-a" / "submission.json").read_text())
    assert meta["fine_tuning"]["method"] == "full"


def test_without_scorecard_the_models_are_scored_or_the_missing_one_named(root, monkeypatch):
    """No scorecard given: submit scores the pair itself; offline, the hub model it cannot load is named in
    one line and nothing is written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = "\n".join(line for line in good_b(root).splitlines() if not line.startswith("scorecard"))
    before = snapshot(root)
    with pytest.raises(EtbenchError, match="synthetic/synthetic-base.* not available") as info:
        submissions.submit(write(root, text), root=root)
    assert "\n" not in str(info.value)
    assert snapshot(root) == before


def test_schema_ships_with_the_package_and_is_valid():
    import jsonschema

    schema = submissions.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["required"]) >= {"name", "model", "base", "fine_tuning", "license", "contact"}


def test_cli_bad_submission_is_one_line_and_exit_2(root):
    before = snapshot(root)
    bad = write(root, "name: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "etbench.cli", "submit", str(bad), "--root", str(root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("etbench: error: ") and "not valid YAML" in lines[0]
    assert snapshot(root) == before


def test_shipped_scorecard_schema_is_current_and_accepts_fixtures():
    """assets/schemas/scorecard.schema.json is scorecard.json_schema() (regenerate it when the format changes)."""
    import jsonschema

    shipped = json.loads((submissions.SCHEMA_PATH.parent / "scorecard.schema.json").read_text())
    assert shipped == json.loads(json.dumps(sc.json_schema()))
    data = json.loads((FIXTURES / "synthetic-ft-a" / "scorecard.json").read_text())
    jsonschema.validate(data, shipped)


def test_a_tag_or_a_commit_prefix_matches_a_recorded_commit():
    assert submissions._same_revision("0123456789abcdef0123456789abcdef01234567", "0123456")
    assert submissions._same_revision("0123456789abcdef0123456789abcdef01234567", "v1.0")
    assert not submissions._same_revision("0123456789abcdef0123456789abcdef01234567", "fedcba98")


def test_submit_refuses_a_root_that_is_not_a_directory_as_leaderboard_build_does(root, tmp_path):
    """Review: ``submit --root /nonexistent`` created a new store there (submissions/results and leaderboards/),
    where ``leaderboard build`` refuses a missing root: a mistyped root is not a new store."""
    sub = write(root, good_b(root), "b.yaml")  # a good submission: only the root is wrong
    (tmp_path / "a-file").write_text("x\n")
    for bad_root in (tmp_path / "no-such-root", tmp_path / "a-file"):
        with pytest.raises(EtbenchError, match=f"^--root: {bad_root} is not a directory$"):
            submissions.submit(sub, root=bad_root)
        with pytest.raises(EtbenchError, match=f"^--root: {bad_root} is not a directory$"):
            lb.build(bad_root)
    assert not (tmp_path / "no-such-root").exists() and (tmp_path / "a-file").read_text() == "x\n"


def test_a_directory_is_refused_as_the_submission_file_and_as_its_scorecard(root):
    """Review: a directory given as the submission said "no such submission file", and a directory as its
    ``scorecard:`` was taken for the scorecard.json in it (the field names the file)."""
    before = snapshot(root)
    with pytest.raises(EtbenchError, match="submissions: is a directory; give the submission's YAML file$"):
        submissions.parse(root / "submissions")
    text = good_b(root).replace("cards/synthetic-ft-b/scorecard.json", "cards/synthetic-ft-b")
    with pytest.raises(EtbenchError, match="scorecard: 'cards/synthetic-ft-b' is a directory; give the scorecard.json"):
        submissions.validate(write(root, text))
    assert snapshot(root) == before
