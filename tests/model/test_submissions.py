"""etbench submit: every bad submission is one clear error and changes no file (synthetic fixtures only)."""


from __future__ import annotations

import shutil

import pytest

from etbench.core.errors import EtbenchError
from etbench.publish import submissions
from support.submission_store import good_b, snapshot, write


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
