"""The README's Python API example runs as written (from the repository root, as a reader would), and
submissions/README.md says what the submission loader does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "7-box accuracy: base" in out.stdout and "Box" in out.stdout and "nodes" in out.stdout


def test_submissions_readme_lists_what_the_submission_loader_refuses(tmp_path):
    """submissions/README.md said a submission is read with ``yaml.safe_load``, which keeps the last of two equal
    keys silently; the loader refuses them, and aliases and deep nesting. Every refusal of the file's YAML that
    the README lists is one the loader makes, with the limits the code has."""
    from etbench.core.errors import EtbenchError
    from etbench.publish import submissions

    text = (ROOT / "submissions" / "README.md").read_text(encoding="utf-8")
    rejected = text[text.index("## What is rejected"):text.index("## Results store")]
    assert "yaml.safe_load`)" not in rejected and "over 1 MB" in rejected
    assert submissions.MAX_SUBMISSION_BYTES == 1_000_000
    depth = submissions.MAX_YAML_DEPTH
    cases = {"key given twice": ("name: a\nname: b\n", "duplicate key 'name'"),
             "aliases": ("a: &x 1\nb: *x\n", "aliases"),
             f"nesting deeper than {depth} levels": ("x: " + "[" * (depth + 1) + "]" * (depth + 1) + "\n",
                                                     "nested too deeply")}
    for phrase, (yaml_text, error) in cases.items():
        assert phrase in rejected
        path = tmp_path / "submission.yaml"
        path.write_text(yaml_text)
        with pytest.raises(EtbenchError, match=error):
            submissions.parse(path)
