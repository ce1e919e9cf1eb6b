"""etbench submit: every bad submission is one clear error and changes no file (synthetic fixtures only)."""


from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from etbench.core.errors import EtbenchError
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
    out = {}
    for sub in ("submissions/results", "leaderboards"):
        base = root / sub
        if base.exists():
            for p in sorted(base.rglob("*")):
                out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else b"<dir>"
    return out


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
    r = tmp_path / "root"
    shutil.copytree(template, r)
    return r


def write(root: Path, text: str | bytes, name: str = "bad.yaml") -> Path:
    path = root / "submissions" / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def good_b(root: Path) -> str:
    return GOOD.format(name="fixture-b", ft="synthetic-ft-b")


def test_local_models_pass_checks_but_must_match_the_scorecard(root, toy_model_dir):
    models_dir = root / "submissions" / "models"
    shutil.copytree(toy_model_dir, models_dir / "base")
    shutil.copytree(toy_model_dir, models_dir / "ft")
    text = good_b(root).replace("{hub: synthetic/synthetic-ft-b, revision: abc1234}", "{path: models/ft}") \
        .replace("{hub: synthetic/synthetic-base, revision: def4567}", "{path: models/base}")
    sub = submissions.parse(write(root, text))
    submissions.check_models(sub)  # same config and tokenizer; the objects are single tokens for it
    assert sub.configs["model"]["model_type"] == "llama" and not sub.notes
    before = snapshot(root)
    # the toy model has 2 layers, the synthetic scorecard says 4: not the same model
    with pytest.raises(EtbenchError, match="the scorecard is for another model"):
        submissions.submit(write(root, text), root=root)
    assert snapshot(root) == before
