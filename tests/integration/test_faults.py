"""Fault and fuzz cases (issue #14): bad input, corrupt files, forged submissions, crashes, races.

Every case ends in one of two ways: exit code 2 with exactly one line on stderr starting
``etbench: error:`` (no traceback), or a correct result. Unless the operation succeeded, the store,
the leaderboard and the output directory are hash-identical to before (``tree_digest``).

Inputs are copies of the committed store (``submissions/``) and the synthetic fixtures
(``tests/fixtures/scorecards``) in temporary directories; the repository's own files are only read.
No case loads a model: options are checked before any model is loaded, so the unloadable model
directory used here is never reached by a correct implementation. Most CLI cases run in-process
(``cli``, the same ``etbench.cli.main`` the console script runs; an escaping exception is
recorded as the traceback a subprocess would print); crashes, races, file-size limits and
unbounded sizes run as real subprocesses (``run``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import etbench
from etbench.core.errors import EtbenchError
from etbench.publish import submissions
from etbench.schema import scorecard
from etbench.scoring import stages

REPO = Path(__file__).resolve().parents[2]
COMMITTED_CARD = REPO / "submissions" / "results" / "tiny-ft"
COMMITTED_SUBMISSION = REPO / "submissions" / "tiny-ft.yaml"
FIXTURES = REPO / "tests" / "fixtures" / "scorecards"
PACKAGE_PARENT = Path(etbench.__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and a marker per directory) under ``path``; {} if absent."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out: dict[str, str] = {}
    if not path.is_dir():
        return out
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.name == LOCK_FILE:  # the empty file writers flock: coordination, neither store nor leaderboard
            continue
        if p.is_symlink():
            out[rel] = "<link>" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Result:
    rc: int
    out: str
    err: str


def cli(*args: Any) -> Result:
    """``etbench ARGS`` in this process (what the console script runs: ``etbench.cli.main``)."""
    from etbench import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["etbench", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_module.main()
                rc = 0
            except SystemExit as exit_:
                rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:  # noqa: BLE001 - what a subprocess would print before exiting with 1
                err.write(traceback.format_exc())
                rc = 1
    finally:
        sys.argv = saved
    return Result(rc, out.getvalue(), err.getvalue())


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
    return env


def _file_size_limit(nbytes: int) -> Callable[[], None]:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """This process's writes past ``nbytes`` fail with EFBIG for the block (soft limit; restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def spawn(*args: Any, fsize: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "etbench.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_file_size_limit(fsize) if fsize else None)


def run(*args: Any, timeout: float = 120, fsize: int | None = None) -> Result:
    """``etbench ARGS`` as a subprocess; a run past ``timeout`` is killed and counts as a failure."""
    proc = spawn(*args, fsize=fsize)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return Result(-9, out, err + f"\n<still running after {timeout} s: killed>")
    return Result(proc.returncode, out, err)


def assert_error(res: Result, *fragments: str) -> str:
    """Exit 2, exactly one stderr line ``etbench: error: ...`` naming every fragment (case-insensitive)."""
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert "Traceback" not in res.err, res.err[-3000:]
    assert res.rc == 2, f"exit {res.rc}: {res.err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("etbench: error: "), res.err[-2000:]
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_ok(res: Result) -> None:
    assert "Traceback" not in res.err, res.err[-3000:]
    assert res.rc == 0, f"exit {res.rc}: {res.err[-2000:]}"


def strict_json(path: Path) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path}: non-finite JSON constant {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def measured_names(board: Path) -> list[str]:
    return [r["name"] for r in strict_json(board / "leaderboard.json")["rows"] if r["origin"] == "measured"]


LOCK_FILE = ".etbench.lock"
ABSOLUTE_PATH = re.compile(r"""(?<![\w.:/])/(?:work|home|root|tmp|Users|mnt|var|opt|private)/""")


# ---------------------------------------------------------------------------------------------
# Inputs: cards derived from the committed tiny-ft scorecard, stores, unloadable models, small filesystems
# ---------------------------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")  # allow_nan: forgers may


def relabel(card: dict[str, Any], ft: str, base: str) -> dict[str, Any]:
    """The committed card as if scored for hub models ``ft``/``base`` (numbers unchanged, hash recomputed)."""
    card = json.loads(json.dumps(card))
    for key, ref in (("ft", ft), ("base", base)):
        card[key]["ref"] = ref
        card[key]["source"] = ref
        card["config"][key] = ref
    for c in card["circuits"]:
        if c["found_on"] == "tiny-base":
            c["found_on"] = base
        elif c["found_on"] == "tiny-ft":
            c["found_on"] = ft
    # the schema version stays the committed card's (3, still submittable): raised to 4 without an edges section,
    # the card would claim a protocol with edges that it does not carry, which submit refuses as edited
    card["config_hash"] = scorecard.config_hash(card["config"])
    return card


def relabel_items(lines: list[str], ft: str, base: str) -> list[str]:
    out = []
    for line in lines:
        row = json.loads(line)
        if row.get("model") == "tiny-ft":
            row["model"] = ft
        elif row.get("model") == "tiny-base":
            row["model"] = base
        out.append(json.dumps(row, sort_keys=True))
    return out


SUBMISSION_YAML = """\
schema_version: 1
name: {name}
description: a copy of the embedded pair's scorecard under another name (test input, not a result)
model: {{hub: {ft}, revision: 0123abc}}
base: {{hub: {base}, revision: 4567def}}
fine_tuning: {{data: test, method: lora, details: none}}
license: MIT
contact: tests@example.invalid
scorecard: cards/{name}/scorecard.json
"""


def write_card(root: Path, name: str, ft: str, base: str = "example/base") -> Path:
    """A submission YAML + its (relabelled committed) scorecard under ``root/submissions``."""
    cards = root / "submissions" / "cards" / name
    cards.mkdir(parents=True, exist_ok=True)
    card = relabel(_load_json(COMMITTED_CARD / "scorecard.json"), ft, base)
    _dump_json(cards / "scorecard.json", card)
    lines = (COMMITTED_CARD / "items.jsonl").read_text(encoding="utf-8").splitlines()
    (cards / "items.jsonl").write_text("\n".join(relabel_items(lines, ft, base)) + "\n", encoding="utf-8")
    yaml = root / "submissions" / f"{name}.yaml"
    yaml.write_text(SUBMISSION_YAML.format(name=name, ft=ft, base=base), encoding="utf-8")
    return yaml


def store_entry(results: Path, name: str, source: Path) -> Path:
    """A stored entry as ``etbench submit`` writes it (scorecard, items, submission.json with hashes)."""
    target = results / name
    target.mkdir(parents=True)
    card_bytes = (source / "scorecard.json").read_bytes()
    items_bytes = (source / "items.jsonl").read_bytes()
    (target / "scorecard.json").write_bytes(card_bytes)
    (target / "items.jsonl").write_bytes(items_bytes)
    card = json.loads(card_bytes)
    meta = {"name": name, "model_ref": card["ft"]["ref"], "model_revision": None, "base_ref": card["base"]["ref"],
            "base_revision": None, "fine_tuning": {"data": "synthetic", "method": "lora", "details": "none"},
            "license": "MIT", "contact": "tests@example.invalid", "description": "synthetic fixture, not a result",
            "submission_file": f"{name}.yaml", "config_hash": card["config_hash"],
            "benchmark_version": card["provenance"]["benchmark_version"],
            "scorecard_sha256": hashlib.sha256(card_bytes).hexdigest(),
            "items_sha256": hashlib.sha256(items_bytes).hexdigest()}
    (target / "submission.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


@pytest.fixture
def synthetic_store(tmp_path) -> Path:
    """ROOT with two stored synthetic entries, ``fixture-a`` and ``fixture-b`` (no leaderboard yet)."""
    root = tmp_path / "root"
    results = root / "submissions" / "results"
    store_entry(results, "fixture-a", FIXTURES / "synthetic-ft-a")
    store_entry(results, "fixture-b", FIXTURES / "synthetic-ft-b")
    return root


@pytest.fixture
def one_entry_store(synthetic_store) -> Path:
    """ROOT with the stored entry ``fixture-a`` only (each build renders one report: faster)."""
    shutil.rmtree(synthetic_store / "submissions" / "results" / "fixture-b")
    return synthetic_store


@pytest.fixture(scope="module")
def committed_store(tmp_path_factory) -> Path:
    """A copy of the repository's submissions/ and leaderboards/ (read-only template: copy before changing)."""
    root = tmp_path_factory.mktemp("committed") / "root"
    shutil.copytree(REPO / "submissions", root / "submissions")
    shutil.copytree(REPO / "leaderboards", root / "leaderboards")
    return root


@pytest.fixture
def unloadable_model(tmp_path) -> Path:
    """A directory that resolves as a model (config.json) but cannot be loaded (no weights, no tokenizer):
    a command that reaches model loading fails on it, so an error naming an option proves the option
    was checked first."""
    d = tmp_path / "unloadable-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return d


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and sys.platform.startswith("linux")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """An existing directory holding one file, that this process cannot write (a read-only tmpfs as root)."""
    d = tmp_path / "readonly"
    if _can_mount():
        with tmpfs(d, "1m"):
            (d / "existing.txt").write_text("keep me\n")
            done = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True)
            if done.returncode != 0:
                pytest.skip("cannot remount read-only")
            yield d
        return
    if os.geteuid() == 0:
        pytest.skip("running as root without mount: no read-only directory available")
    d.mkdir()
    (d / "existing.txt").write_text("keep me\n")
    d.chmod(0o555)
    try:
        yield d
    finally:
        d.chmod(0o755)


@pytest.fixture
def full_dir(tmp_path):
    """A directory on a 64 KiB filesystem that is already full except for ~4 KiB."""
    if not _can_mount():
        pytest.skip("needs root and mount for a small tmpfs (the file-size-limit cases cover non-root)")
    d = tmp_path / "full"
    with tmpfs(d, "64k"):
        with open(d / "filler.bin", "wb") as fh:
            try:
                fh.write(b"\0" * (60 * 1024))
            except OSError:
                pass
        yield d


# ---------------------------------------------------------------------------------------------
# 1. leaderboard build: deletes only what it generated; --out of every wrong kind
# ---------------------------------------------------------------------------------------------

def test_leaderboard_out_keeps_user_files(one_entry_store, tmp_path):
    out = tmp_path / "site"
    (out / "docs").mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "docs" / "data.csv").write_text("a,b\n1,2\n")
    (out / ".keep").write_text("")
    before = tree_digest(out)
    assert_ok(cli("leaderboard", "build", "--root", one_entry_store, "--out", out, "--no-paper"))
    after = tree_digest(out)
    assert {k: v for k, v in after.items() if k in before} == before  # every user file intact
    assert measured_names(out) == ["fixture-a"]


def test_leaderboard_rebuild_removes_only_its_own_stale_files(synthetic_store):
    board = synthetic_store / "leaderboards"
    assert_ok(cli("leaderboard", "build", "--root", synthetic_store, "--no-paper"))
    (board / "MY_NOTES.md").write_text("mine\n")
    (board / "reports" / "draft.md").write_text("my draft\n")
    shutil.rmtree(synthetic_store / "submissions" / "results" / "fixture-b")
    assert_ok(cli("leaderboard", "build", "--root", synthetic_store, "--no-paper"))
    assert not (board / "reports" / "fixture-b.html").exists() and not (board / "reports" / "fixture-b.md").exists()
    assert (board / "MY_NOTES.md").read_text() == "mine\n"
    assert (board / "reports" / "draft.md").read_text() == "my draft\n"
    assert measured_names(board) == ["fixture-a"]


def test_leaderboard_build_cleans_stale_temp_files(one_entry_store):
    synthetic_store = one_entry_store
    board = synthetic_store / "leaderboards"
    assert_ok(cli("leaderboard", "build", "--root", synthetic_store, "--no-paper"))
    stale = board / ".index.html.3f9a0c1b2d4e.tmp"  # what a Transaction killed mid-way leaves (temporary_name)
    stale.write_text("<half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    (board / ".gitkeep").write_text("")
    assert_ok(cli("leaderboard", "build", "--root", synthetic_store, "--no-paper"))
    assert not stale.exists()
    assert (board / ".gitkeep").exists()


def test_leaderboard_out_is_a_file(synthetic_store, tmp_path):
    out = tmp_path / "site"
    out.write_text("not a directory\n")
    before = tree_digest(tmp_path)
    assert_error(cli("leaderboard", "build", "--root", synthetic_store, "--out", out), str(out))
    assert tree_digest(tmp_path) == before


def test_leaderboard_out_readonly(synthetic_store, readonly_dir):
    before = tree_digest(readonly_dir)
    assert_error(cli("leaderboard", "build", "--root", synthetic_store, "--out", readonly_dir), str(readonly_dir))
    assert tree_digest(readonly_dir) == before


def test_leaderboard_out_full_filesystem(synthetic_store, full_dir):
    before = tree_digest(full_dir)
    assert_error(cli("leaderboard", "build", "--root", synthetic_store, "--out", full_dir / "site"))
    assert tree_digest(full_dir) == before


def test_leaderboard_build_under_a_file_size_limit_changes_nothing(synthetic_store):
    assert_ok(cli("leaderboard", "build", "--root", synthetic_store, "--no-paper"))
    shutil.rmtree(synthetic_store / "submissions" / "results" / "fixture-b")  # the rebuild must change files
    before = tree_digest(synthetic_store)
    with file_size_limit(1024):
        res = cli("leaderboard", "build", "--root", synthetic_store, "--no-paper")
    assert_error(res)
    assert tree_digest(synthetic_store) == before


# ---------------------------------------------------------------------------------------------
# 2. corrupt store entries: reported and skipped by `leaderboard build`, one-line errors elsewhere
# ---------------------------------------------------------------------------------------------

def _random_bytes(n: int = 4096) -> bytes:
    return random.Random(14).randbytes(n)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 7])  # mid-line


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "scorecard-random-bytes": lambda d: (d / "scorecard.json").write_bytes(_random_bytes()),
    "scorecard-truncated": lambda d: _truncate(d / "scorecard.json"),
    "scorecard-empty": lambda d: (d / "scorecard.json").write_bytes(b""),
    "scorecard-json-list": lambda d: (d / "scorecard.json").write_text("[]"),
    "scorecard-missing": lambda d: (d / "scorecard.json").unlink(),
    "items-random-bytes": lambda d: (d / "items.jsonl").write_bytes(_random_bytes()),
    "items-truncated-mid-line": lambda d: _truncate(d / "items.jsonl"),
    "items-missing": lambda d: (d / "items.jsonl").unlink(),
    "submission-json-missing": lambda d: (d / "submission.json").unlink(),
    "submission-json-random-bytes": lambda d: (d / "submission.json").write_bytes(_random_bytes(300)),
    "scorecard-nan-value": lambda d: (d / "scorecard.json").write_text(
        (d / "scorecard.json").read_text().replace('"value": 0.', '"value": NaN, "was": 0.', 1)),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_leaderboard_build_skips_a_corrupt_entry(synthetic_store, corruption):
    results = synthetic_store / "submissions" / "results"
    CORRUPTIONS[corruption](results / "fixture-b")
    shutil.rmtree(results / "fixture-a")  # one (corrupt) entry keeps the build fast
    before = tree_digest(results)
    res = cli("leaderboard", "build", "--root", synthetic_store, "--no-paper")
    assert_ok(res)
    assert "fixture-b" in res.err  # reported, not silently dropped
    assert measured_names(synthetic_store / "leaderboards") == []
    assert tree_digest(results) == before


def test_leaderboard_build_keeps_good_entries_next_to_a_corrupt_one(synthetic_store):
    results = synthetic_store / "submissions" / "results"
    CORRUPTIONS["scorecard-random-bytes"](results / "fixture-b")
    res = cli("leaderboard", "build", "--root", synthetic_store, "--no-paper")
    assert_ok(res)
    assert measured_names(synthetic_store / "leaderboards") == ["fixture-a"] and "fixture-b" in res.err


@pytest.mark.parametrize("corruption", ["scorecard-random-bytes", "scorecard-truncated", "items-random-bytes",
                                        "items-truncated-mid-line", "scorecard-nan-value"])
def test_report_on_a_corrupt_entry(synthetic_store, corruption, tmp_path):
    results = synthetic_store / "submissions" / "results"
    CORRUPTIONS[corruption](results / "fixture-b")
    out = tmp_path / "report"
    name = "items.jsonl" if corruption.startswith("items") else "scorecard.json"
    assert_error(cli("report", results / "fixture-b", "--out", out), name)
    assert not out.exists()


@pytest.mark.parametrize("corruption", ["scorecard-random-bytes", "items-random-bytes", "items-truncated-mid-line"])
def test_compare_with_a_corrupt_entry(synthetic_store, corruption):
    results = synthetic_store / "submissions" / "results"
    CORRUPTIONS[corruption](results / "fixture-b")
    name = "items.jsonl" if corruption.startswith("items") else "scorecard.json"
    assert_error(cli("compare", results / "fixture-a", results / "fixture-b"), name)


def test_report_by_name_with_a_corrupt_store_entry(synthetic_store, tmp_path):
    results = synthetic_store / "submissions" / "results"
    CORRUPTIONS["scorecard-random-bytes"](results / "fixture-b")
    assert_error(cli("report", "fixture-b", "--store", results, "--out", tmp_path / "r"), "fixture-b")


# ---------------------------------------------------------------------------------------------
# 3. forged submissions: every published number is re-derived from the items and circuits
# ---------------------------------------------------------------------------------------------

def _find(rows: list[dict], **match: Any) -> dict:
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))


def _set_est(est: dict, value: float, low: float | None = None, high: float | None = None) -> None:
    est["value"] = value
    est["low"] = value - 0.01 if low is None else low
    est["high"] = value + 0.01 if high is None else high


def _drop_items(items: list[dict], **match: Any) -> list[dict]:
    return [r for r in items if not all(r.get(k) == v for k, v in match.items())]


def _add_discovery_scores(card: dict, items: list) -> list:
    """Per-prompt discovery scores under which the base circuit's heads are not a sure choice (an outside
    head ranks below them on all 32 prompts but above them on resamples rich in its bad prompts), while
    the scorecard still says the overlap has no CI: submit must recompute the interval and refuse."""
    rows = []
    for circuit in card["circuits"]:
        for group, heads in circuit["heads"].items():
            scored = [(h, [-1.0] * 32) for h in heads]
            if circuit["name"] == "base" and heads:
                outside = next([l, h] for l in range(30) for h in range(9) if [l, h] not in heads)
                scored.append((outside, [-2.2 if i % 5 == 0 else -0.6 for i in range(32)]))  # mean -0.95
            rows += [{"measure": "discovery_score", "model": circuit["name"], "group": group, "layer": lh[0],
                      "head": lh[1], "item": i, "score": x} for lh, xs in scored for i, x in enumerate(xs)]
    # the forged scores replace any the card has (a card scored since issue #12 keeps them)
    return [r for r in items if r.get("measure") != "discovery_score"] + rows


FORGERIES: dict[str, tuple[str, Callable[[dict, list], list | None]]] = {
    # name: (field the message must name, mutate(card, items) -> new items or None)
    "faithfulness-0.99": ("faithfulness", lambda c, i: _set_est(
        _find(c["faithfulness"], circuit="base", model="ft")["faithfulness"], 0.99)),
    "faithfulness-ci-edited": ("faithfulness", lambda c, i: _find(c["faithfulness"], circuit="base", model="ft")[
        "faithfulness"].update(low=0.12, high=0.14)),
    "faithfulness-model-accuracy": ("accuracy", lambda c, i: _set_est(
        _find(c["faithfulness"], circuit="base", model="ft")["model_accuracy"], 0.95)),
    "circuit-accuracy": ("circuit accuracy", lambda c, i: _set_est(
        _find(c["faithfulness"], circuit="base", model="ft")["circuit_accuracy"], 0.7)),
    "accuracy-ci-edited": ("accuracy", lambda c, i: _find(c["accuracy"], model="ft", n_boxes=7)["accuracy"].update(
        low=0.79, high=0.81)),
    "accuracy-value": ("accuracy", lambda c, i: _set_est(_find(c["accuracy"], model="ft", n_boxes=7)["accuracy"], 0.93)),
    "accuracy-0.99-rows-deleted": ("accuracy", lambda c, i: (
        _set_est(_find(c["accuracy"], model="ft", n_boxes=7)["accuracy"], 0.99),
        _drop_items(i, measure="accuracy", model="ft", n_boxes=7))[1]),
    "base-accuracy-rows-deleted": ("accuracy", lambda c, i: _drop_items(i, measure="accuracy", model="base",
                                                                        n_boxes=3)),
    "head-overlap-1.0": ("overlap", lambda c, i: _set_est(
        _find(c["overlap"], heads="circuit", group="all")["base_in_ft"], 1.0, 1.0, 1.0)),
    "jaccard-edited": ("overlap", lambda c, i: _set_est(
        _find(c["overlap"], heads="circuit", group="value_fetcher")["jaccard"], 0.9, 0.9, 0.9)),
    "circuit-heads-edited": ("overlap", lambda c, i: _find(c["circuits"], name="ft")["heads"].update(
        _find(c["circuits"], name="base")["heads"])),
    "equal-size-overlap-edited": ("equal-size head overlap", lambda c, i: _set_est(
        _find(c["overlap"], heads="circuit-top", group="value_fetcher")["base_in_ft"], 1.0)),
    # a forger hiding that a fine-tuned group covers most heads (overlap no better than chance)
    "overlap-chance-edited": ("by chance", lambda c, i: _find(c["overlap"], heads="circuit", group="all")[
        "chance"].update(base_in_ft=0.1, p_value=1e-9)),
    "dcm-overlap-edited": ("overlap", lambda c, i: _set_est(
        _find(c["overlap"], heads="dcm", group="all")["base_in_ft"], 1.0, 1.0, 1.0)),
    "cmap-gain": ("cmap", lambda c, i: _set_est(_find(c["cmap"], group="full", variant="output")["gain"], 0.5)),
    "cmap-gain-ci": ("cmap", lambda c, i: _find(c["cmap"], group="full", variant="output")["gain"].update(
        low=0.2, high=0.21)),
    "cmap-patched-accuracy": ("cmap", lambda c, i: _set_est(
        _find(c["cmap"], group="full", variant="output")["patched_accuracy"], 0.95)),
    "cmap-normalised-gain": ("cmap", lambda c, i: _set_est(
        _find(c["cmap"], group="value_fetcher", variant="output")["normalised_gain"], 0.99)),
    "cmap-rows-deleted": ("cmap", lambda c, i: _drop_items(i, measure="cmap", group="full", variant="output")),
    "dcm-test-accuracy": ("dcm", lambda c, i: _set_est(c["dcm"][0]["test_accuracy"], 0.99)),
    "nan-accuracy": ("accuracy", lambda c, i: _find(c["accuracy"], model="ft", n_boxes=7)["accuracy"].update(
        value=math.nan)),
    "nan-ci-low": ("accuracy", lambda c, i: _find(c["accuracy"], model="base", n_boxes=5)["accuracy"].update(
        low=math.nan)),
    "infinity-faithfulness": ("faithfulness", lambda c, i: _find(c["faithfulness"], circuit="base", model="ft")[
        "faithfulness"].update(value=math.inf, high=math.inf)),
    "nan-overlap": ("overlap", lambda c, i: _find(c["overlap"], heads="circuit", group="all")["jaccard"].update(
        value=math.nan)),
    "nan-random-baseline": ("random", lambda c, i: c["faithfulness"][0]["random_circuit_accuracy"].update(
        value=math.nan)),
    "nan-semantics": ("semantics", lambda c, i: c["semantics"][0]["accuracy"].update(value=math.nan)),
    "semantics-outside-range": ("semantics", lambda c, i: c["semantics"][0]["accuracy"].update(value=0.99)),
    "nan-cmap-normalised": ("cmap", lambda c, i: _find(c["cmap"], group="full", variant="output")[
        "normalised_gain"].update(high=-math.inf)),
    "ceiling-form-accuracy": ("ceiling", lambda c, i: _set_est(_find(c["ceilings"], model="base")["form_accuracy"], 0.9)),
    "ceiling-model-accuracy": ("ceiling", lambda c, i: _set_est(_find(c["ceilings"], model="ft")["model_accuracy"], 0.9)),
    "ceiling-every-head-edited": ("ceiling", lambda c, i: _find(c["ceilings"], model="ft")[
        "every_head_every_position"].update(low=0.01)),
    "ceiling-floor": ("ceiling", lambda c, i: _set_est(_find(c["ceilings"], model="ft")["no_heads_accuracy"], 0.2)),
    "ceiling-form-faithfulness": ("ceiling", lambda c, i: _set_est(
        _find(c["ceilings"], model="base")["form_faithfulness"], 1.0)),
    "ceiling-mib": ("ceiling", lambda c, i: _set_est(_find(c["ceilings"], model="ft")["form_faithfulness_mib"], 0.99)),
    "ceiling-mib-ci-edited": ("ceiling", lambda c, i: _find(c["ceilings"], model="base")[
        "form_faithfulness_mib"].update(low=0.8)),
    "ceiling-rows-deleted": ("ceiling", lambda c, i: _drop_items(i, measure="ceiling", model="ft")),
    "ceiling-form-rows-flipped": ("ceiling", lambda c, i: [dict(r, correct=True) if r["measure"] == "ceiling"
                                                           and r["ablation"] == "form_all_heads" else r for r in i]),
    "mib-faithfulness": ("mib", lambda c, i: _set_est(
        _find(c["faithfulness"], circuit="base", model="ft")["faithfulness_mib"], 0.99)),
    "mib-faithfulness-ci": ("mib", lambda c, i: _find(c["faithfulness"], circuit="ft", model="ft")[
        "faithfulness_mib"].update(low=-0.5, high=0.5)),
    "circuit-overlap-ci-invented": ("overlap", lambda c, i: _find(c["overlap"], heads="circuit", group="all")[
        "jaccard"].update(low=0.1, high=0.9)),
    "discovery-scores-without-their-ci": ("overlap", _add_discovery_scores),
    "items-score-not-a-number": ("items", lambda c, i: i + [{"measure": "discovery_score", "model": "base",
                                                             "group": "value_fetcher", "layer": 0, "head": 0,
                                                             "item": 0, "score": "high"}]),
    "items-correct-not-bool": ("items", lambda c, i: [dict(r, correct="yes") if r["measure"] == "accuracy" else r
                                                      for r in i]),
    "items-duplicate-rows": ("items", lambda c, i: i + [r for r in i if r["measure"] == "accuracy"
                                                         and r["model"] == "ft" and r["n_boxes"] == 7][:3]),
    # issue #26, class 1: what submit did not re-derive (range-checked, or not checked at all)
    "dcm-selections-deleted-overlap-0.90": ("dcm_selections: missing", lambda c, i: (
        c.pop("dcm_selections"), _set_est(_find(c["overlap"], heads="dcm", group="all")["jaccard"], 0.90, 0.85, 0.95))
        and None),
    "dcm-selections-of-a-seed-deleted": ("DCM selections", lambda c, i: c.update(
        dcm_selections=[x for x in c["dcm_selections"] if x["seed"] != 2])),
    "ceilings-deleted": ("ceilings of base: missing", lambda c, i: c.update(ceilings=[])),
    "cmap-row-duplicated": ("listed twice", lambda c, i: c["cmap"].append(json.loads(json.dumps(c["cmap"][0])))),
    "semantics-row-duplicated": ("listed twice", lambda c, i: c["semantics"].append(
        json.loads(json.dumps(c["semantics"][0])))),
    "accuracy-at-3-boxes-deleted": ("accuracy of ft at 3 boxes: missing", lambda c, i: c.update(
        accuracy=[a for a in c["accuracy"] if (a["model"], a["n_boxes"]) != ("ft", 3)])),
    "faithfulness-row-deleted": ("faithfulness of the ft circuit on base: missing", lambda c, i: c.update(
        faithfulness=[f for f in c["faithfulness"] if (f["circuit"], f["model"]) != ("ft", "base")])),
    "random-baseline-stated-though-absent": ("random circuit accuracy of the base circuit on base", lambda c, i: _set_est(
        _find(c["faithfulness"], circuit="base", model="base")["random_circuit_accuracy"], 0.05, 0.02, 0.12)),
    "random-baseline-absence-undeclared": ("random circuit accuracy", lambda c, i: c.update(
        absent=[a for a in c["absent"] if not a["where"].startswith("random circuit")])),
    "random-baseline-rows-invented": ("random circuit accuracy of the base circuit on ft", lambda c, i: i + [
        {"measure": "random_circuit", "model": "ft", "circuit": "base", "draw": d, "n_boxes": 7, "item": k,
         "correct": k % 3 == 0} for d in range(5) for k in range(200)]),
    "sizing-record-restored": ("sizing of the base circuit", lambda c, i: _find(c["circuits"], name="base").update(
        sizing={"target_fraction": 0.9, "target_faithfulness": 0.1, "reached": True, "chosen": {}, "curve": []})),
    "sizing-rows-forged-for-a-wrong-target": ("sizing of the ft circuit: target_faithfulness", lambda c, i: (
        _find(c["circuits"], name="ft").update(sizing={
            "target_fraction": 0.9, "target_faithfulness": 0.2, "reached": False, "chosen": {}, "curve": [],
            "n": 100, "mean_n": 500, "model_accuracy": 0.5, "no_heads_accuracy": 0.0, "form_faithfulness": 0.5,
            "note": "", "prompts": "", "strategy": "scaled-shape"}),
        c.update(absent=[a for a in c["absent"] if a["where"] != "sizing of the ft circuit"]),
        i + [{"measure": "sizing", "model": "ft", "circuit": "ft", "ablation": a, "n_boxes": 7, "item": k,
              "correct": k < lim} for a, lim in (("model", 50), ("form_all_heads", 25), ("no_heads", 0))
             for k in range(100)])[2]),
    "absent-for-another-reason": ("declared absent for", lambda c, i: c["absent"][0].update(reason="too slow")),
    "absent-names-a-published-number": ("names no number", lambda c, i: c["absent"].append(
        {"where": "accuracy of ft at 7 boxes", "reason": "per-draw random-circuit rows were not kept before scorecard "
                                                         "schema 3"})),
    "estimate-level-edited": ("accuracy of ft at 7 boxes: level", lambda c, i: _find(c["accuracy"], model="ft",
                                                                                      n_boxes=7)["accuracy"].update(
        level=0.5)),
    "random-baseline-sd-note-edited": ("random circuit", lambda c, i: _find(
        c["faithfulness"], circuit="base", model="base")["random_circuit_accuracy"].update(note="sd 0.001")),
}


@pytest.fixture(scope="module")
def genuine_card(tmp_path_factory) -> Path:
    """A submission directory holding the committed tiny-ft scorecard, relabelled for hub models."""
    root = tmp_path_factory.mktemp("genuine") / "root"
    write_card(root, "example-ft", "example/ft")
    return root


def _forge(genuine: Path, tmp_path: Path, forgery: str) -> Path:
    root = tmp_path / "root"
    shutil.copytree(genuine, root)
    card_path = root / "submissions" / "cards" / "example-ft" / "scorecard.json"
    items_path = card_path.parent / "items.jsonl"
    card = _load_json(card_path)
    items = [json.loads(line) for line in items_path.read_text().splitlines()]
    _, mutate = FORGERIES[forgery]
    new_items = mutate(card, items)
    if new_items is not None and not isinstance(new_items, tuple):
        items = new_items
    card["config_hash"] = scorecard.config_hash(card["config"])  # a careful forger keeps the hash consistent
    _dump_json(card_path, card)
    items_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in items))
    return root


def test_genuine_card_is_accepted(genuine_card):
    sub = submissions.parse(genuine_card / "submissions" / "example-ft.yaml")
    submissions.check_scorecard(sub, sub.scorecard)  # the control: re-derivation agrees with a real card


#: Forgeries submit does not catch yet, each with the reason (strict: the test fails once the gap is closed).
KNOWN_GAPS: dict[str, str] = {}


@pytest.mark.parametrize("forgery", [pytest.param(f, marks=pytest.mark.xfail(reason=KNOWN_GAPS[f], strict=True))
                                     if f in KNOWN_GAPS else f for f in sorted(FORGERIES)])
def test_forged_scorecard_is_rejected_naming_the_field(genuine_card, tmp_path, forgery):
    root = _forge(genuine_card, tmp_path, forgery)
    sub = submissions.parse(root / "submissions" / "example-ft.yaml")
    with pytest.raises(EtbenchError) as err:
        submissions.check_scorecard(sub, sub.scorecard)
    assert FORGERIES[forgery][0].lower() in str(err.value).lower(), str(err.value)


@pytest.mark.parametrize("forgery", ["faithfulness-0.99", "accuracy-0.99-rows-deleted", "nan-accuracy"])
def test_forged_submission_changes_nothing(genuine_card, committed_store, tmp_path, forgery):
    root = _forge(genuine_card, tmp_path, forgery)
    shutil.copytree(committed_store / "submissions" / "results", root / "submissions" / "results")
    shutil.copytree(committed_store / "leaderboards", root / "leaderboards")
    before = tree_digest(root)
    assert_error(cli("submit", root / "submissions" / "example-ft.yaml", "--root", root), FORGERIES[forgery][0])
    assert tree_digest(root) == before


def test_submission_base_path_without_a_model(genuine_card, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    (root / "submissions" / "weights" / "base").mkdir(parents=True)
    yaml = root / "submissions" / "example-ft.yaml"
    yaml.write_text(yaml.read_text().replace("base: {hub: example/base, revision: 4567def}",
                                             "base: {path: weights/base}"))
    before = tree_digest(root)
    assert_error(cli("submit", yaml, "--root", root), "base.path")
    assert tree_digest(root) == before


def test_submission_model_path_with_garbage_config(genuine_card, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    weights = root / "submissions" / "weights" / "ft"
    weights.mkdir(parents=True)
    (weights / "config.json").write_bytes(_random_bytes(200))
    yaml = root / "submissions" / "example-ft.yaml"
    yaml.write_text(yaml.read_text().replace("model: {hub: example/ft, revision: 0123abc}",
                                             "model: {path: weights/ft}"))
    before = tree_digest(root)
    assert_error(cli("submit", yaml, "--root", root), "config.json")
    assert tree_digest(root) == before


def test_submitted_files_hold_no_absolute_local_path(genuine_card, tmp_path):
    """A local adapter submitted by path: accepted or refused, nothing published names this machine's paths."""
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    adapter = root / "submissions" / "weights" / "tiny-ft"
    shutil.copytree(PACKAGE_PARENT / "etbench" / "assets" / "tiny" / "tiny-ft", adapter)
    yaml = root / "submissions" / "example-ft.yaml"
    yaml.write_text(yaml.read_text().replace("model: {hub: example/ft, revision: 0123abc}",
                                             "model: {path: weights/tiny-ft}"))
    res = cli("submit", yaml, "--root", root)
    assert "Traceback" not in res.err and res.rc in (0, 2), res.err[-2000:]
    for sub in ("submissions/results", "leaderboards"):
        for path in sorted((root / sub).rglob("*")) if (root / sub).exists() else []:
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                assert str(root) not in text and not ABSOLUTE_PATH.search(text), path


def test_committed_store_publishes_no_absolute_path():
    """The repository's own published files (store and leaderboard) name no local path."""
    for sub in ("submissions/results", "leaderboards"):
        for path in sorted((REPO / sub).rglob("*")):
            if path.is_file():
                match = ABSOLUTE_PATH.search(path.read_text(encoding="utf-8", errors="replace"))
                assert match is None, f"{path.relative_to(REPO)} holds a local path ({match.group(0)}...)"


# ---------------------------------------------------------------------------------------------
# 4. crashes and races: kill -9 mid-submit, half-written entries, two concurrent submits
# ---------------------------------------------------------------------------------------------

def _listing(root: Path) -> tuple:
    return tuple(sorted(str(p.relative_to(root)) for sub in ("submissions/results", "leaderboards")
                        if (root / sub).exists() for p in (root / sub).rglob("*")))


def test_kill_9_mid_submit_then_submit_and_build_work(genuine_card, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    yaml = root / "submissions" / "example-ft.yaml"
    start = _listing(root)
    proc = spawn("submit", yaml, "--root", root)
    deadline = time.time() + 120
    killed_midway = False
    while time.time() < deadline and proc.poll() is None:
        if _listing(root) != start:  # the first file or directory appeared: kill now
            os.kill(proc.pid, signal.SIGKILL)
            killed_midway = True
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    assert killed_midway, "submit finished before anything was written (nothing to interrupt)"
    assert_ok(cli("leaderboard", "build", "--root", root))
    res = cli("submit", yaml, "--root", root)  # no --replace: the interrupted entry never became visible
    assert_ok(res)
    assert measured_names(root / "leaderboards") == ["example-ft"]
    leftovers = [p for p in (root / "submissions" / "results").rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    leftovers += [p for p in (root / "leaderboards").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_half_written_entry_is_reported_skipped_and_replaceable(genuine_card, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    partial = root / "submissions" / "results" / "example-ft"
    partial.mkdir(parents=True)
    shutil.copy(genuine_card / "submissions" / "cards" / "example-ft" / "scorecard.json", partial / "scorecard.json")
    res = cli("leaderboard", "build", "--root", root)
    assert_ok(res)
    assert "example-ft" in res.err and measured_names(root / "leaderboards") == []
    assert_ok(cli("submit", root / "submissions" / "example-ft.yaml", "--root", root))
    assert measured_names(root / "leaderboards") == ["example-ft"]


def test_two_concurrent_submits_are_both_listed(genuine_card, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    first = root / "submissions" / "example-ft.yaml"
    second = write_card(root, "example-ft-2", "example/ft-2")
    procs = [spawn("submit", first, "--root", root), spawn("submit", second, "--root", root)]
    outcomes = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outcomes):
        assert_ok(Result(proc.returncode, out, err))
    board = root / "leaderboards"
    assert sorted(measured_names(board)) == ["example-ft", "example-ft-2"]
    index = (board / "index.html").read_text()
    for name in ("example-ft", "example-ft-2"):
        assert f'href="reports/{name}.html"' in index and (board / "reports" / f"{name}.html").is_file()


def test_submit_under_a_file_size_limit_changes_nothing(genuine_card, committed_store, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    shutil.copytree(committed_store / "submissions" / "results", root / "submissions" / "results")
    shutil.copytree(committed_store / "leaderboards", root / "leaderboards")
    before = tree_digest(root)
    with file_size_limit(64 * 1024):
        res = cli("submit", root / "submissions" / "example-ft.yaml", "--root", root)
    assert_error(res)
    assert tree_digest(root) == before


def test_submit_when_leaderboards_is_a_file(genuine_card, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(genuine_card, root)
    (root / "leaderboards").write_text("not a directory\n")
    before = tree_digest(root)
    assert_error(cli("submit", root / "submissions" / "example-ft.yaml", "--root", root), "leaderboards")
    assert tree_digest(root) == before


def test_submit_into_a_readonly_root(genuine_card, readonly_dir):
    yaml = write_card(readonly_dir.parent / "src", "example-ft", "example/ft")
    before = tree_digest(readonly_dir)
    assert_error(cli("submit", yaml, "--root", readonly_dir), str(readonly_dir))
    assert tree_digest(readonly_dir) == before


# ---------------------------------------------------------------------------------------------
# 5. output paths of the other commands
# ---------------------------------------------------------------------------------------------

def test_data_generate_out_is_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    before = tree_digest(tmp_path)
    assert_error(cli("data", "generate", "--n", "3", "--out", tmp_path / "d"), str(tmp_path / "d"))
    assert tree_digest(tmp_path) == before


def test_data_generate_out_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    before = tree_digest(tmp_path)
    assert_error(cli("data", "generate", "--n", "3", "--out", tmp_path / "f" / "d.jsonl"), str(tmp_path / "f"))
    assert tree_digest(tmp_path) == before


def test_data_generate_out_readonly(readonly_dir):
    before = tree_digest(readonly_dir)
    assert_error(cli("data", "generate", "--n", "3", "--out", readonly_dir / "d.jsonl"), str(readonly_dir))
    assert tree_digest(readonly_dir) == before


def test_data_generate_out_full(full_dir):
    before = tree_digest(full_dir)
    assert_error(cli("data", "generate", "--n", "500", "--out", full_dir / "d.jsonl"), "d.jsonl")
    assert tree_digest(full_dir) == before


def test_data_generate_under_a_file_size_limit(tmp_path):
    assert_error(run("data", "generate", "--n", "500", "--out", tmp_path / "d.jsonl", fsize=8 * 1024), "d.jsonl")
    assert tree_digest(tmp_path) == {}


def test_report_out_is_a_file(tmp_path):
    (tmp_path / "r").write_text("x")
    before = tree_digest(tmp_path)
    assert_error(cli("report", FIXTURES / "synthetic-ft-a", "--out", tmp_path / "r"), str(tmp_path / "r"))
    assert tree_digest(tmp_path) == before


def test_report_out_readonly(readonly_dir):
    before = tree_digest(readonly_dir)
    assert_error(cli("report", FIXTURES / "synthetic-ft-a", "--out", readonly_dir), str(readonly_dir))
    assert tree_digest(readonly_dir) == before


def test_report_out_full(full_dir):
    before = tree_digest(full_dir)
    assert_error(cli("report", FIXTURES / "synthetic-ft-a", "--out", full_dir / "r"))
    assert tree_digest(full_dir) == before


def test_compare_out_is_a_file(tmp_path):
    (tmp_path / "c").write_text("x")
    before = tree_digest(tmp_path)
    assert_error(cli("compare", FIXTURES / "synthetic-ft-a", FIXTURES / "synthetic-ft-b", "--out", tmp_path / "c"),
                 str(tmp_path / "c"))
    assert tree_digest(tmp_path) == before


def test_report_on_a_value_outside_its_ci(tmp_path):
    """A card whose estimate lies outside its CI: the figures must not crash (or the card is refused)."""
    card_dir = tmp_path / "card"
    shutil.copytree(FIXTURES / "synthetic-ft-a", card_dir)
    card = _load_json(card_dir / "scorecard.json")
    card["cmap"][0]["gain"].update(value=0.9, low=0.1, high=0.2)
    card["accuracy"][0]["accuracy"].update(value=0.1, low=0.5, high=0.6)
    _dump_json(card_dir / "scorecard.json", card)
    res = cli("report", card_dir, "--out", tmp_path / "out")
    if res.rc == 0:
        assert (tmp_path / "out" / "report.html").is_file()
    else:
        assert_error(res, "scorecard.json")
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 6. sizes, counts, devices, base == ft: all refused before any model is loaded
# ---------------------------------------------------------------------------------------------

def test_data_generate_unbounded_n_is_refused_quickly():
    res = run("data", "generate", "--n", "1000000000000", timeout=30)
    assert_error(res, "--n")


@pytest.mark.parametrize("n", ["0", "-5"])
def test_data_generate_nonpositive_n(n, tmp_path):
    assert_error(cli("data", "generate", "--n", n, "--out", tmp_path / "d.jsonl"), "--n")
    assert not (tmp_path / "d.jsonl").exists()


OPTION_CASES = [
    # (case id, argv with MODEL for the unloadable model dir, option the message must name)
    ("accuracy-n-unbounded", ["accuracy", "--model", "MODEL", "--n", "1000000000000"], "--n"),
    ("accuracy-n-0", ["accuracy", "--model", "MODEL", "--n", "0"], "--n"),
    ("accuracy-batch-size-0", ["accuracy", "--model", "MODEL", "--batch-size", "0"], "--batch-size"),
    ("accuracy-out-is-file", ["accuracy", "--model", "MODEL", "--out", "FILE"], "--out"),
    ("accuracy-dtype", ["accuracy", "--model", "MODEL", "--dtype", "float8"], "float8"),
    ("circuit-eval-mean-n-0", ["circuit", "eval", "--model", "MODEL", "--circuit", "tiny-base", "--mean-n", "0"],
     "--mean-n"),
    ("circuit-eval-random-draws-neg", ["circuit", "eval", "--model", "MODEL", "--circuit", "tiny-base",
                                       "--random-draws", "-3"], "--random-draws"),
    ("circuit-eval-n-0", ["circuit", "eval", "--model", "MODEL", "--circuit", "tiny-base", "--n", "0"], "--n"),
    ("circuit-eval-completeness-neg", ["circuit", "eval", "--model", "MODEL", "--circuit", "tiny-base",
                                       "--completeness-draws", "-1"], "--completeness-draws"),
    ("circuit-eval-out-is-dir", ["circuit", "eval", "--model", "MODEL", "--circuit", "tiny-base", "--out", "DIR"],
     "--out"),
    ("circuit-discover-n-0", ["circuit", "discover", "--model", "MODEL", "--out", "NEW", "--n", "0"], "--n"),
    ("circuit-discover-out-is-dir", ["circuit", "discover", "--model", "MODEL", "--out", "DIR"], "--out"),
    ("score-base-equals-ft", ["score", "--base", "MODEL", "--ft", "MODEL", "--out", "NEW"], "same"),
    ("score-out-is-file", ["score", "--base", "MODEL", "--ft", "MODEL2", "--out", "FILE"], "--out"),
    ("score-preset-unknown", ["score", "--base", "MODEL", "--ft", "MODEL2", "--preset", "huge", "--out", "NEW"],
     "preset"),
    ("score-seed-negative", ["score", "--base", "MODEL", "--ft", "MODEL2", "--seed", "-1", "--out", "NEW"], "--seed"),
    ("data-n-boxes-1", ["data", "generate", "--n-boxes", "1"], "between 2 and 26"),
]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


DEVICE_CASES = [
    ("accuracy-device-cuda", ["accuracy", "--model", "MODEL", "--device", "cuda"], "cuda"),
    ("accuracy-device-cuda-1", ["accuracy", "--model", "MODEL", "--device", "cuda:1"], "cuda"),
    ("accuracy-device-mps", ["accuracy", "--model", "MODEL", "--device", "mps"], "mps"),
    ("score-device-cuda", ["score", "--base", "MODEL", "--ft", "MODEL2", "--device", "cuda", "--out", "NEW"], "cuda"),
    ("circuit-eval-device-mps", ["circuit", "eval", "--model", "MODEL", "--circuit", "tiny-base", "--device", "mps"],
     "mps"),
]


def _argv(argv: list[str], model: Path, tmp_path: Path) -> list[Any]:
    model2 = tmp_path / "unloadable-model-2"
    if not model2.exists():
        shutil.copytree(model, model2)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir(exist_ok=True)
    subst = {"MODEL": model, "MODEL2": model2, "FILE": tmp_path / "a-file", "DIR": tmp_path / "a-dir",
             "NEW": tmp_path / "new-out"}
    return [subst.get(a, a) for a in argv]


@pytest.mark.parametrize("argv, option", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_bad_option_refused_before_model_load(argv, option, unloadable_model, tmp_path):
    args = _argv(argv, unloadable_model, tmp_path)
    before = tree_digest(tmp_path)
    assert_error(cli(*args), option)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("argv, device", [c[1:] for c in DEVICE_CASES], ids=[c[0] for c in DEVICE_CASES])
def test_unavailable_device_refused_before_model_load(argv, device, unloadable_model, tmp_path):
    if device == "cuda" and _has_cuda() or device == "mps" and _has_mps():
        pytest.skip(f"{device} is available here")
    args = _argv(argv, unloadable_model, tmp_path)
    before = tree_digest(tmp_path)
    assert_error(cli(*args), device)
    assert tree_digest(tmp_path) == before


def test_score_same_alias_is_refused_quickly(tmp_path):
    res = run("score", "--base", "tiny-base", "--ft", "tiny-base", "--out", tmp_path / "o", "--no-progress",
              timeout=180)  # the whole pipeline (minutes) before the fix; seconds after, even on a loaded machine
    assert_error(res, "same")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# 7. the stage cache: anything unreadable or edited is a miss
# ---------------------------------------------------------------------------------------------

STAGE_FILES: dict[str, Callable[[str, Any], bytes]] = {
    "random-bytes": lambda key, result: _random_bytes(512),
    "empty": lambda key, result: b"",
    "truncated": lambda key, result: json.dumps({"key": key, "result": result}).encode()[:20],
    "json-list": lambda key, result: b"[]",
    "json-null": lambda key, result: b"null",
    "json-string": lambda key, result: b'"result"',
    "key-without-result": lambda key, result: json.dumps({"key": key}).encode(),
    "result-edited": lambda key, result: json.dumps({"key": key, "result": dict(result, accuracy=0.97,
                                                                                  ci95=[0.92, 0.99])}).encode(),
    "result-edited-null": lambda key, result: json.dumps({"key": key, "result": None}).encode(),
    "checksum-field-forged": lambda key, result: json.dumps({"key": key, "result": dict(result, accuracy=0.97),
                                                             "checksum": "0" * 64}).encode(),
}


@pytest.mark.parametrize("kind", sorted(STAGE_FILES))
def test_stage_cache_bad_file_is_a_miss(kind, tmp_path):
    genuine = {"accuracy": 0.0, "ci95": [0.0, 0.037], "n": 100}
    cache = stages.StageCache(tmp_path / "stages")
    assert cache.run("accuracy_ft", {"n": 100}, lambda: genuine) == genuine
    key = stages.stage_key("accuracy_ft", {"n": 100})
    cache.path("accuracy_ft").write_bytes(STAGE_FILES[kind](key, genuine))
    calls = []
    again = stages.StageCache(tmp_path / "stages")
    result = again.run("accuracy_ft", {"n": 100}, lambda: calls.append(1) or genuine)
    assert result == genuine and calls == [1]  # recomputed, not trusted
    assert again.run("accuracy_ft", {"n": 100}, lambda: pytest.fail("a valid stage file must be a hit")) == genuine


def test_stage_cache_directory_in_place_of_a_stage_file(tmp_path):
    cache = stages.StageCache(tmp_path / "stages")
    cache.path("cmap").mkdir(parents=True)
    try:
        result = cache.run("cmap", {"n": 1}, lambda: {"x": 1})
    except EtbenchError as err:
        assert "cmap" in str(err)
    else:
        assert result == {"x": 1}


def test_stage_cache_hit_is_not_recomputed(tmp_path):
    cache = stages.StageCache(tmp_path / "stages")
    cache.run("models", {"a": 1}, lambda: {"m": [1, 2]})
    again = stages.StageCache(tmp_path / "stages")
    assert again.run("models", {"a": 1}, lambda: pytest.fail("recomputed a valid stage")) == {"m": [1, 2]}


def test_stage_result_with_nan_is_stored_as_strict_json(tmp_path):
    cache = stages.StageCache(tmp_path / "stages")
    cache.run("faithfulness_ft", {"a": 1}, lambda: {"ci": [float("nan"), 1.0]})
    strict_json(cache.path("faithfulness_ft"))


# ---------------------------------------------------------------------------------------------
# 8. comparability by protocol; revisions
# ---------------------------------------------------------------------------------------------

def _protocol_card(tmp_path: Path, name: str, ft: str, base: str = "example/base",
                   edit: Callable[[dict], None] | None = None, flip: int = 0) -> Path:
    d = tmp_path / name
    d.mkdir()
    card = relabel(_load_json(COMMITTED_CARD / "scorecard.json"), ft, base)
    if edit is not None:
        edit(card)
        card["config_hash"] = scorecard.config_hash(card["config"])
    _dump_json(d / "scorecard.json", card)
    rows = [json.loads(x) for x in relabel_items((COMMITTED_CARD / "items.jsonl").read_text().splitlines(), ft, base)]
    for r in rows:  # another fine-tune: flip some of its answers
        if flip and r["measure"] == "accuracy" and r["model"] == "ft" and r["item"] % flip == 0:
            r["correct"] = not r["correct"]
    (d / "items.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return d


def test_compare_two_fine_tunes_of_one_base(tmp_path):
    a = _protocol_card(tmp_path, "a", "example/goat")
    b = _protocol_card(tmp_path, "b", "example/float", flip=3)
    res = cli("compare", a, b)
    assert_ok(res)
    assert "accuracy, 7 boxes" in res.out and "McNemar" in res.out


@pytest.mark.parametrize("field, edit", [
    ("seed", lambda c: c["config"].update(seed=1)),
    ("preset", lambda c: c["config"]["preset"].update(name="paper")),
    ("accuracy_n", lambda c: c["config"]["preset"].update(accuracy_n=500)),
    ("benchmark version", lambda c: (c["config"].update(benchmark_version="0.9"),
                                     c["provenance"].update(benchmark_version="0.9"))),
])
def test_compare_refuses_another_protocol_naming_why(field, edit, tmp_path):
    a = _protocol_card(tmp_path, "a", "example/goat")
    b = _protocol_card(tmp_path, "b", "example/float", edit=edit)
    assert_error(cli("compare", a, b), field)


def test_compare_fine_tunes_of_different_bases_same_protocol(tmp_path):
    a = _protocol_card(tmp_path, "a", "example/goat", base="example/base-1")
    b = _protocol_card(tmp_path, "b", "example/float", base="example/base-2", flip=4)
    res = cli("compare", a, b)
    assert_ok(res)
    assert "accuracy, 7 boxes" in res.out


def _weights_revision():
    from etbench.models import weights_revision

    return weights_revision


def test_adapter_revision_is_a_hash_of_its_files(tmp_path):
    weights_revision = _weights_revision()
    adapter = tmp_path / "tiny-ft"
    shutil.copytree(PACKAGE_PARENT / "etbench" / "assets" / "tiny" / "tiny-ft", adapter)
    first = weights_revision(str(adapter))
    assert first and first == weights_revision(str(adapter)) and str(tmp_path) not in first
    with open(adapter / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    assert weights_revision(str(adapter)) != first


def test_gguf_revision_is_a_hash_of_the_file(tmp_path):
    weights_revision = _weights_revision()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    first = weights_revision(str(gguf))
    gguf.write_bytes(b"GGUF" + bytes(99) + b"\1")
    assert first and weights_revision(str(gguf)) != first


def test_alias_revision_covers_the_adapter_and_its_base():
    weights_revision = _weights_revision()
    assert weights_revision("tiny-ft") != weights_revision("tiny-base")
    assert weights_revision("tiny-ft") == weights_revision("tiny-ft")


# ---------------------------------------------------------------------------------------------
# Issue #26: the writing commands, score-many's options, the edges (classes 2-4; class 1 is FORGERIES above)
# ---------------------------------------------------------------------------------------------

def _plant(path: Path, kind: str, tmp_path: Path) -> Path:
    """A user's regular file, or a symlink to one elsewhere, at ``path``; returns the file holding the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_text("USER DATA\n")
        return path
    target = tmp_path / f"link-target-{path.name}"
    target.write_text("USER DATA\n")
    path.symlink_to(target)
    return target


@pytest.mark.parametrize("kind", ["file", "link"])
@pytest.mark.parametrize("command, out, name", [
    (("data", "generate", "--n", "3", "--out"), "prompts.jsonl", "prompts.jsonl"),
    (("circuit", "discover", "-m", "tiny-base", "--out"), "circuit.json", "circuit.json"),
    (("accuracy", "-m", "tiny-base", "--n", "5", "--out"), "acc", "accuracy.json"),
], ids=["data-generate", "circuit-discover", "accuracy"])
def test_writing_commands_keep_a_users_file_and_link(command, out, name, kind, tmp_path):
    """Class 2: ``data generate --out FILE``, ``circuit discover --out FILE`` and ``accuracy --out DIR`` replaced a
    user's file (``data generate`` a symlink by a regular file; ``accuracy`` also through a symlinked directory)."""
    real = tmp_path / "real"
    real.mkdir()
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(real, target_is_directory=True)  # the output directory reached through a link
    where = linked_dir / out
    victim = where / name if out == "acc" else where
    data = _plant(victim, kind, tmp_path)
    before = tree_digest(tmp_path)
    assert_error(cli(*command, where), str(victim))
    assert tree_digest(tmp_path) == before and data.read_text() == "USER DATA\n"
    assert victim.is_symlink() == (kind == "link")


@contextlib.contextmanager
def silent_server():
    """A port that accepts connections and never answers (what an unrelated service or a stuck host looks like)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _closed_port() -> str:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"127.0.0.1:{port}"


SCORE_MANY = ("score-many", "--base", "tiny-base", "--ft", "tiny-ft")


@pytest.mark.parametrize("options, fragment", [
    (("--ray-address", "nohost"), "--ray-address must be auto, HOST:PORT"),
    (("--ray-address", "host:99999"), "--ray-address must be"),
    (("--cpus-per-side", "-1"), "--cpus-per-side"),
    (("--gpus-per-side", "-0.5"), "--gpus-per-side"),
    (("--retries", "-1"), "--retries"),
    (("--num-cpus", "0"), "--num-cpus"),
    (("--device", "tpu"), "--device must be"),
], ids=["address-syntax", "address-port", "cpus-negative", "gpus-negative", "retries-negative", "num-cpus-0",
        "device-unknown"])
def test_score_many_options_are_checked_before_ray(options, fragment, tmp_path):
    """Class 3: malformed Ray options ended in tracebacks from Ray; now one line before Ray is imported."""
    out = tmp_path / "runs"
    started = time.monotonic()
    assert_error(cli(*SCORE_MANY, "--out", out, *options), fragment)
    assert time.monotonic() - started < 60 and not out.exists()


@pytest.mark.parametrize("address", ["closed", "silent"])
def test_score_many_unreachable_ray_address_is_one_line_quickly(address, tmp_path):
    """Class 3: an unreachable --ray-address hung in Ray's connection log past 2 minutes. A closed port (refused)
    and a port that accepts but never answers (timed out) are both refused in one line naming the address."""
    out = tmp_path / "runs"
    with silent_server() as silent:
        where = silent if address == "silent" else _closed_port()
        started = time.monotonic()
        line = assert_error(run(*SCORE_MANY, "--out", out, "--ray-address", where, timeout=150), where)
    assert "no ray head answers there" in line.lower()
    assert time.monotonic() - started < 120 and not out.exists()


@pytest.mark.parametrize("pair, fragment", [
    ({"base": "tiny-base", "ft": "no-such-org/no-such-model", "out": "runs/x"}, "no-such-org/no-such-model"),
    ({"base": "tiny-base", "ft": "./missing-checkpoint", "out": "runs/y"}, "missing-checkpoint"),
], ids=["hub-id-not-cached", "local-path-missing"])
def test_score_many_plan_with_a_missing_model_fails_before_ray(pair, fragment, tmp_path):
    """Class 3: a plan naming a missing fine-tune failed only inside the workers, 30-50 s after Ray started."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(json.dumps({"preset": "quick", "device": "cpu", "pairs": [pair]}))
    assert_error(cli("score-many", "--plan", plan), fragment)
    assert not (tmp_path / "runs").exists()


def test_score_many_plan_with_an_unknown_device_fails_before_ray(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(json.dumps({"device": "gpu0", "pairs": [{"base": "tiny-base", "ft": "tiny-ft", "out": "r"}]}))
    assert_error(cli("score-many", "--plan", plan), "--device must be")
    assert not (tmp_path / "r").exists()


def _python_module(*args: Any, timeout: float = 120) -> Result:
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("module, args, fragment", [
    ("etbench.training.tiny", ("--boxes", "x,y"), "--boxes"),
    ("etbench.training.tiny", ("--threads", "0"), "--threads"),
    ("etbench.training.zoo", ("--boxes", "3,1"), "--boxes"),
    ("etbench.training.tiny", ("--no-monitor", "--base-only", "--out", "{file}"), "exists and is not a directory"),
    ("etbench.training.zoo", ("--only", "tiny-null", "--out", "{file}"), "exists and is not a directory"),
    ("etbench.training.planted", ("--steps", "0"), "--steps"),
], ids=["tiny-boxes", "tiny-threads", "zoo-boxes", "tiny-out-file", "zoo-out-file", "planted-steps"])
def test_training_clis_refuse_bad_arguments_before_training(module, args, fragment, tmp_path):
    """Class 4: the trainers' CLIs ended in tracebacks (``--boxes x,y``) or started training with a file as
    --out. Now one error line (exit 2, naming the option; argparse's usage block is not printed), before any model
    loads."""
    user_file = tmp_path / "a-file"
    user_file.write_text("USER DATA\n")
    started = time.monotonic()
    res = _python_module(module, *(a.replace("{file}", str(user_file)) for a in args))
    assert "Traceback" not in res.err and res.rc == 2, res.err[-2000:]
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m {module}: error:") and fragment in lines[0], res.err
    assert user_file.read_text() == "USER DATA\n" and time.monotonic() - started < 100


def test_lm_eval_unknown_task_is_one_line():
    """Class 4: ``etbench lm-eval --tasks nosuch`` passed lm-eval's ValueError traceback through."""
    line = assert_error(run("lm-eval", "--tasks", "nosuch", "--model", "hf", "--model_args", "pretrained=x",
                            timeout=240), "nosuch")
    assert "entity_tracking" in line


@pytest.mark.parametrize("args, fragments", [
    ((), ("lm-eval: no task given", "--tasks entity_tracking")),
    (("run",), ("lm-eval: no task given",)),
    (("--model_args", "pretrained=x"), ("lm-eval: no task given",)),
    (("--tasks", "entity_tracking"), ("model 'hf' needs pretrained", "--model_args pretrained=")),
    (("--model", "hf", "--tasks", "entity_tracking", "--model_args", "dtype=float32"), ("needs pretrained",)),
    (("--model", "nosuch", "--tasks", "entity_tracking"), ("no model for this name", "nosuch")),
    # a --config file's tasks and model count as lm-eval merges them
    (("--config", "{tasks}"), ("model 'hf' needs pretrained",)),
    (("--config", "{model}", "--tasks", "entity_tracking"), ("no model for this name", "nosuch")),
    (("--config", "{missing}"), ("lm-eval: --config", "not found")),
])
def test_lm_eval_without_tasks_or_model_is_one_line(tmp_path, args, fragments):
    """Review: ``etbench lm-eval`` with no arguments raised lm-eval's ValueError ("No tasks specified"), and with
    tasks but no ``--model_args pretrained=...`` HFLM's TypeError, each as a traceback."""
    files = {"tasks": "tasks: [entity_tracking]\n", "model": "model: nosuch\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    args = [a.format(**{n: tmp_path / f"{n}.yaml" for n in (*files, "missing")}) for a in args]
    assert_error(cli("lm-eval", *args), *fragments)


def test_lm_eval_run_check_passes_tasks_and_model_args_from_the_command_line_or_a_config_file(tmp_path):
    """The check before an lm-eval run lets through what lm-eval runs: tasks and ``pretrained`` given on the
    command line, in the ``--config`` file, or one in each."""
    from lm_eval._cli import HarnessCLI

    from etbench.task.harness import check_run_args

    config = tmp_path / "c.yaml"
    config.write_text("tasks: [entity_tracking]\nmodel_args: pretrained=x,dtype=float32\n")
    saved = sys.argv
    try:
        for args in (["--tasks", "entity_tracking", "--model_args", "pretrained=x"], ["--config", str(config)],
                     ["--config", str(config), "--model_args", "dtype=float16"],
                     ["--model", "dummy", "--tasks", "entity_tracking"]):
            sys.argv = ["lm_eval", "run", *args]
            check_run_args(HarnessCLI().parse_args())
    finally:
        sys.argv = saved


@pytest.fixture
def no_model_load(monkeypatch):
    """``models.load`` refuses: a command that loads a model fails with this line instead of loading."""
    from etbench import models

    def refuse(ref, **kwargs):
        raise EtbenchError(f"a model was loaded: {ref}")

    monkeypatch.setattr(models, "load", refuse)


@pytest.mark.parametrize("args, fragments", [
    (("circuit", "discover", "-m", "tiny-base", "--out", "{tmp}/c.json", "--minimality", "bogus"),
     ("minimality mode must be pairs, single or none, got 'bogus'",)),
    (("circuit", "eval", "-m", "tiny-base", "-c", "paper:llama7b"),
     ("circuit llama7b does not fit tiny-base (30 layers x 9 heads)",)),
    (("edges", "--base", "tiny-base", "--ft", "tiny-ft", "--circuit-base", "tiny-base", "--circuit-ft",
      "paper:llama7b", "--out", "{tmp}/e"), ("circuit llama7b does not fit tiny-ft",)),
    # a circuit that fits gets as far as the load
    (("circuit", "eval", "-m", "tiny-base", "-c", "tiny-base"), ("a model was loaded: tiny-base",)),
])
def test_circuit_options_and_fit_are_checked_before_the_model_loads(tmp_path, no_model_load, args, fragments):
    """Review: ``circuit discover --minimality bogus`` and ``circuit eval -c paper:llama7b`` on a small model were
    refused only after the model had loaded; the model's shape is read from its config.json on disk instead."""
    assert_error(cli(*(a.replace("{tmp}", str(tmp_path)) for a in args)), *fragments)
    assert not any(tmp_path.iterdir())


def test_circuit_eval_prints_undefined_not_nan(tmp_path):
    """Also seen in issue #26: ``circuit eval`` on a random toy model (accuracy 0) printed ``nan`` for the curve
    area. The toy's ratios are undefined and read so."""
    from support.toy_pair import write_toy_pair

    root = write_toy_pair(tmp_path / "toy")
    res = cli("circuit", "eval", "-m", root / "base", "-c", root / "circuit.json", "--n", "4", "--mean-n", "4",
              "--random-draws", "1", "--completeness-draws", "1", "--no-progress")
    assert_ok(res)
    assert "nan" not in res.out.lower() and "undefined" in res.out
