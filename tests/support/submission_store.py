"""A submission store built from the synthetic scorecard fixtures, for tests of ``etbench submit``.

Registered as a pytest plugin by tests/conftest.py, so the ``template`` and ``root`` fixtures are
available to every test file; the helpers are imported by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from etbench.publish import submissions

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scorecards"

GOOD = """\
schema_version: 1
name: {name}
description: synthetic fixture, not a result
model: {{hub: synthetic/{ft}, revision: abc1234}}
base: {{hub: synthetic/synthetic-base, revision: def4567}}
fine_tuning: {{data: synthetic, method: lora, details: none}}
license: MIT
contact: tests@example.invalid
scorecard: cards/{ft}/scorecard.json
preset: quick
"""


def snapshot(root: Path) -> dict[str, bytes]:
    """Every stored result and leaderboard file under ``root``, by relative path."""
    out = {}
    for sub in ("submissions/results", "leaderboards"):
        base = root / sub
        if base.exists():
            for p in sorted(base.rglob("*")):
                out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else b"<dir>"
    return out


def write(root: Path, text: str | bytes, name: str = "bad.yaml") -> Path:
    path = root / "submissions" / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def good_b(root: Path) -> str:
    return GOOD.format(name="fixture-b", ft="synthetic-ft-b")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store that already holds one accepted submission (so the leaderboard is non-trivial)."""
    r = tmp_path_factory.mktemp("template") / "root"
    cards = r / "submissions" / "cards"
    for name in ("synthetic-ft-a", "synthetic-ft-b"):
        shutil.copytree(FIXTURES / name, cards / name)
    (r / "submissions" / "a.yaml").write_text(GOOD.format(name="fixture-a", ft="synthetic-ft-a"))
    submissions.submit(r / "submissions" / "a.yaml", root=r)
    return r


@pytest.fixture
def root(template, tmp_path) -> Path:
    """A fresh copy of ``template`` for one test."""
    r = tmp_path / "root"
    shutil.copytree(template, r)
    return r
