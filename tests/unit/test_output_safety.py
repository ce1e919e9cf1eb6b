"""Output directories: a command deletes or overwrites only files it created (hostile-user pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from etbench.core.io import is_temporary, remove_stale_temporaries, temporary_name


def test_only_etbench_temporaries_count_as_stale(tmp_path):
    """A user's hidden backups (``.bashrc.2020.bak``, ``.config.old.tmp``) in or under an output directory are
    not temporaries of etbench's writers, and cleaning up after a killed build must leave them alone."""
    (tmp_path / "proj").mkdir()
    mine = [tmp_path / ".bashrc.2020.bak", tmp_path / "proj" / ".config.old.tmp", tmp_path / ".a.b.tmp"]
    for path in mine:
        path.write_text("precious\n")
    stale_file = temporary_name(tmp_path / "index.html")
    stale_file.write_text("<half")
    stale_dir = temporary_name(tmp_path / "proj" / "entry", ".bak")
    stale_dir.mkdir()
    (stale_dir / "scorecard.json").write_text("{}")
    assert is_temporary(stale_file) and is_temporary(stale_dir)
    assert not any(is_temporary(p) for p in mine)
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert all(p.read_text() == "precious\n" for p in mine)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_leaderboard_files_never_overwrite_a_users_file_of_the_same_name(tmp_path):
    """``leaderboard build --out DIR`` into a directory holding the user's own ``index.html`` refuses (one
    error naming it) and writes nothing; files an earlier build wrote (its manifest) are rewritten."""
    import pytest

    from etbench.core.errors import EtbenchError
    from etbench.publish import outputs

    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("MY PAGE\n")
    before = _tree(out)
    with pytest.raises(EtbenchError, match="index.html"):
        with outputs.Transaction() as txn:
            outputs.write_tree(out, {"index.html": b"<generated>", "leaderboard.csv": b"a\n"}, txn)
    assert _tree(out) == before
    (out / "index.html").unlink()
    with outputs.Transaction() as txn:  # a build into a fresh directory, then a rebuild over its own files
        outputs.write_tree(out, {"index.html": b"<generated>", "leaderboard.csv": b"a\n"}, txn)
    with outputs.Transaction() as txn:
        outputs.write_tree(out, {"index.html": b"<generated 2>", "leaderboard.csv": b"b\n"}, txn)
    assert (out / "index.html").read_bytes() == b"<generated 2>"
    (out / "mine.txt").write_text("mine\n")
    (out / "leaderboard.csv").write_text("edited by hand\n")
    with outputs.Transaction() as txn:  # the user edited a generated file: it is the build's to rewrite
        outputs.write_tree(out, {"index.html": b"<generated 3>", "leaderboard.csv": b"c\n"}, txn)
    assert (out / "mine.txt").read_text() == "mine\n" and (out / "leaderboard.csv").read_bytes() == b"c\n"


def test_leaderboard_build_refuses_a_root_that_is_not_a_directory(tmp_path):
    """A mistyped ``--root`` built a paper-only leaderboard (and created ``--out``) as if the store were empty."""
    import pytest

    from etbench.core.errors import EtbenchError
    from etbench.publish import leaderboard as lb

    (tmp_path / "a-file").write_text("x\n")
    for root in (tmp_path / "no-such-root", tmp_path / "a-file"):
        with pytest.raises(EtbenchError, match="--root"):
            lb.build(root, out_dir=tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "no-such-root").exists()


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scorecards"


def test_report_and_compare_never_overwrite_a_users_report(tmp_path):
    """``etbench report`` and ``etbench compare --out`` replaced a ``report.md``/``report.html`` they had not
    written. Now, like ``leaderboard build`` (the same ``outputs.write_tree``), each refuses a file of the same
    name that is not in its own manifest (one error line, exit 2, nothing written, nothing printed), and a
    re-run over its own earlier output, even one edited by hand, still works."""
    from support.commands import assert_one_line_error, etbench

    card_a, card_b = str(FIXTURES / "synthetic-ft-a"), str(FIXTURES / "synthetic-ft-b")
    commands = {"report": ["report", card_a], "compare": ["compare", card_a, card_b]}
    for command, args in commands.items():
        mine = tmp_path / f"mine-{command}"
        mine.mkdir()
        (mine / "report.md").write_text("MY NOTES\n")
        before = _tree(mine)
        refused = etbench(*args, "--out", str(mine), cwd=tmp_path)
        assert_one_line_error(refused, "report.md")
        assert f"`etbench {command}`" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert refused.stdout == "" and _tree(mine) == before

        own = tmp_path / f"own-{command}"
        assert etbench(*args, "--out", str(own), cwd=tmp_path).returncode == 0
        first = _tree(own)
        assert {"report.md", "report.html"} <= set(first)
        (own / "report.md").write_text("edited by hand\n")  # a file it wrote: its to rewrite
        again = etbench(*args, "--out", str(own), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert _tree(own) == first
    # one command's report is not another's to replace: compare into report's directory is refused
    theirs = tmp_path / "own-report"
    before = _tree(theirs)
    assert_one_line_error(etbench(*commands["compare"], "--out", str(theirs), cwd=tmp_path), "etbench compare")
    assert _tree(theirs) == before


def test_score_never_overwrites_a_file_it_did_not_write(tmp_path):
    """``etbench score --out DIR`` replaced any scorecard.json, items.jsonl, timings.json or report.md in DIR.
    Now a file of an output's name that no earlier score run listed in DIR's manifest is refused before a
    model loads (one line, exit 2, nothing written: not even the stage cache), by ``score`` and by
    ``score-many`` (before Ray starts); the manifest's files are the next run's to replace."""
    from etbench.core.io import claim_outputs
    from etbench.scoring.pipeline import SCORE_OUTPUTS, SCORE_WRITER, check_inputs
    from support.commands import assert_one_line_error, etbench

    mine = tmp_path / "mine"  # `score --out mine`: a user's report.md there
    mine.mkdir()
    (mine / "report.md").write_text("MY NOTES\n")
    many = tmp_path / "many"  # `score-many --out many` writes under many/<ft>: a user's timings.json there
    (many / "tiny-ft").mkdir(parents=True)
    (many / "tiny-ft" / "timings.json").write_text("{}")
    for command, out, pair_dir in (("score", mine, mine), ("score-many", many, many / "tiny-ft")):
        before = _tree(out)
        refused = etbench(command, "--base", "tiny-base", "--ft", "tiny-ft", "--out", str(out), cwd=tmp_path)
        assert_one_line_error(refused, "etbench score")
        assert "was not written by" in refused.stderr
        assert _tree(out) == before and not (pair_dir / "stages").exists()

    # what the manifest lists is the command's own: accepted (the API's check, no model loaded)
    own = tmp_path / "own"
    own.mkdir()
    claim_outputs(own, SCORE_OUTPUTS, SCORE_WRITER)  # as a run does: claimed, then written
    for name in SCORE_OUTPUTS:
        (own / name).write_text("from an earlier run\n")
    check_inputs("tiny-base", "tiny-ft", own, seed=0, dtype="float32", device="cpu")


def test_score_claims_check_again_and_the_manifest_name_is_guarded(tmp_path):
    """Review of the manifest: the check ran only before an hour-long run, so a report.md put into --out while
    it ran was overwritten; a name claimed but never written (the report, when a score-many pair failed) made a
    later user file of that name replaceable; score-many's workers.json was never checked; a directory (or a
    non-manifest file) at the manifest's name failed only at the end, or was replaced."""
    from etbench.core.errors import EtbenchError
    from etbench.core.io import claim_outputs, generated_files
    from etbench.scoring.distributed import SCORE_MANY_OUTPUTS, PairJob, _check
    from etbench.scoring.pipeline import SCORE_DATA_OUTPUTS, SCORE_WRITER, check_inputs

    out = tmp_path / "out"
    out.mkdir()
    check_inputs("tiny-base", "tiny-ft", out, seed=0, dtype="float32", device="cpu")  # empty: accepted
    (out / "timings.json").write_text("a user's file, put here while the run ran\n")
    with pytest.raises(EtbenchError, match="was not written by"):
        claim_outputs(out, SCORE_DATA_OUTPUTS, SCORE_WRITER)
    assert generated_files(out, SCORE_WRITER) == [] and not (out / SCORE_WRITER.manifest).exists()
    (out / "timings.json").unlink()

    claim_outputs(out, SCORE_DATA_OUTPUTS, SCORE_WRITER)  # the scorecard's files only: the report is not claimed
    assert "report.md" not in generated_files(out, SCORE_WRITER)
    (out / "report.md").write_text("MY NOTES\n")
    with pytest.raises(EtbenchError, match="report.md exists and was not written by"):
        check_inputs("tiny-base", "tiny-ft", out, seed=0, dtype="float32", device="cpu")
    (out / "report.md").unlink()

    # score-many's own file is checked before Ray starts
    (out / SCORE_MANY_OUTPUTS[0]).write_text("{}")
    settings = {"preset": "quick", "seed": 0, "dtype": None, "device": "cpu", "discovery": None}
    with pytest.raises(EtbenchError, match="workers.json exists and was not written by"):
        _check([PairJob("tiny-base", "tiny-ft", str(out))], settings)
    (out / SCORE_MANY_OUTPUTS[0]).unlink()
    _check([PairJob("tiny-base", "tiny-ft", str(out))], settings)

    # the manifest's name: a directory or a file that is not a manifest is someone else's
    for bad in ("dir", "not json", '{"files": "x"}'):
        other = tmp_path / f"other-{len(bad)}"
        other.mkdir()
        manifest = other / SCORE_WRITER.manifest
        manifest.mkdir() if bad == "dir" else manifest.write_text(bad)
        with pytest.raises(EtbenchError, match="is not a manifest written by"):
            check_inputs("tiny-base", "tiny-ft", other, seed=0, dtype="float32", device="cpu")
        with pytest.raises(EtbenchError, match="is not a manifest written by"):
            claim_outputs(other, SCORE_DATA_OUTPUTS, SCORE_WRITER)
        assert manifest.is_dir() if bad == "dir" else manifest.read_text() == bad


def _cli(*args) -> tuple[int, str]:
    """``etbench ARGS`` in this process (``etbench.cli.main``, as the console script): (exit code, stderr)."""
    import contextlib
    import io
    import sys

    from etbench import cli

    err, saved = io.StringIO(), sys.argv
    sys.argv = ["etbench", *map(str, args)]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                cli.main()
                rc = 0
            except SystemExit as exit_:
                rc = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return rc, err.getvalue()


def _commands_with_out() -> set[str]:
    """Every CLI command (``group sub`` for nested ones) that takes ``--out``."""
    import typer

    from etbench.cli import app

    found, todo = set(), [("", typer.main.get_command(app))]
    while todo:
        prefix, command = todo.pop()
        for name, sub in getattr(command, "commands", {}).items():
            todo.append((f"{prefix} {name}".strip(), sub))
        if any("--out" in getattr(p, "opts", ()) for p in getattr(command, "params", ())):
            found.add(prefix)
    return found


FIXTURE_CARD = Path(__file__).resolve().parents[1] / "fixtures" / "scorecards" / "synthetic-ft-a"
#: command -> (its arguments with {out} for the output, the output names it writes there); the arguments
#: pass every other check, so only the ownership rule stops it (no case loads a model: the rule runs first)
OUT_CASES = {
    "data generate": (["data", "generate", "--n", "2", "--out", "{out}/prompts.jsonl"], ["prompts.jsonl"]),
    "accuracy": (["accuracy", "-m", "tiny-base", "--out", "{out}"], ["accuracy.json", "accuracy_items.jsonl"]),
    "score": (["score", "--out", "{out}"], ["scorecard.json", "items.jsonl", "circuit_base.json",
                                            "circuit_ft.json", "timings.json", "report.md", "report.html"]),
    "score-many": (["score-many", "--base", "tiny-base", "--ft", "tiny-ft", "--out", "{out}"],
                   ["tiny-ft/scorecard.json", "tiny-ft/workers.json"]),
    "circuit discover": (["circuit", "discover", "-m", "tiny-base", "--out", "{out}/c.json"], ["c.json"]),
    "circuit eval": (["circuit", "eval", "-m", "tiny-base", "-c", "tiny-base", "--out", "{out}/e.json"], ["e.json"]),
    "leaderboard build": (["leaderboard", "build", "--root", "{out}/root", "--out", "{out}"],
                          ["index.html", "leaderboard.csv"]),
    "compare": (["compare", str(FIXTURE_CARD), str(FIXTURE_CARD.parent / "synthetic-ft-b"), "--out", "{out}"],
                ["report.md", "report.html"]),
    "report": (["report", str(FIXTURE_CARD), "--out", "{out}"], ["report.md", "report.html"]),
    "edges": (["edges", "--base", "tiny-base", "--ft", "tiny-null", "--circuit-base", "tiny-base",
               "--circuit-ft", "tiny-base", "--out", "{out}"],
              ["edges_base.json", "edges_ft.json", "edge_comparison.json"]),
}


def test_every_command_that_writes_keeps_a_users_file_and_link_of_each_output_name(tmp_path):
    """Issue #26: ``data generate --out FILE``, ``accuracy --out DIR`` and ``circuit discover --out FILE``
    replaced a user's file (``data generate`` also a user's symlink, by a regular file). Every command with
    ``--out`` (found by walking the CLI, so a new one must join ``OUT_CASES``) now refuses, in one line with exit
    2, a file of one of its output names that it did not write, and a symlink there (never written through or
    replaced): the user's file, the link and its target keep their bytes."""
    assert _commands_with_out() == set(OUT_CASES)
    for command, (args, names) in OUT_CASES.items():
        for name in names:
            for kind in ("file", "link"):
                out = tmp_path / f"{command.replace(' ', '-')}-{name.replace('/', '-')}-{kind}"
                (out / "root").mkdir(parents=True)
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if kind == "file":
                    target.write_text("MY OWN FILE\n")
                else:
                    (tmp_path / f"elsewhere-{out.name}").write_text("THE LINK'S TARGET\n")
                    target.symlink_to(tmp_path / f"elsewhere-{out.name}")
                before = _tree(out)
                rc, err = _cli(*(a.replace("{out}", str(out)) for a in args))
                lines = [line for line in err.splitlines() if line.strip()]
                assert rc == 2 and len(lines) == 1 and lines[0].startswith("etbench: error:"), (command, name, err)
                assert str(target) in lines[0] and ("not written by" in lines[0] or "symbolic link" in lines[0])
                assert _tree(out) == before, (command, name, kind)
                assert target.is_symlink() == (kind == "link")
    assert all(p.read_text() == "THE LINK'S TARGET\n" for p in tmp_path.glob("elsewhere-*"))
