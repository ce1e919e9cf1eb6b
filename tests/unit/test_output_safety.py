"""Output directories: a command deletes or overwrites only files it created (hostile-user pass)."""

from __future__ import annotations

from pathlib import Path

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
