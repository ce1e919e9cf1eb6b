"""Shared, session-scoped, read-only fixtures. Tests must not modify what these return."""

from __future__ import annotations

from pathlib import Path

import pytest

# fixtures shared by several tiers' test files (tests/support is on sys.path: pyproject's pytest pythonpath)
pytest_plugins = ["support.submission_store"]


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama + word-level tokenizer saved with save_pretrained (seed 0)."""
    from etbench.models.toy import save_toy_model

    return save_toy_model(tmp_path_factory.mktemp("toy_model"), seed=0)
