"""The README is a short manual whose claims hold: its Python API example runs as written (from the repository
root, as a reader would), its set-up commands are what CI runs, its first-result and lm-eval commands are the
ones the benchmark script and the integration test run, its links resolve; submissions/README.md says what the
submission loader does; LICENSE and CITATION.cff say what pyproject and the paper say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: the pages the README's narrative moved to (issue 25), whose links are checked with the README's
DOCS = ["results.md", "guarantees.md", "scaling.md", "benchmarks.md", "layout.md", "commands.md"]


def _fenced(section: str) -> list[str]:
    return re.findall(r"```(?:\w+)?\n(.*?)```", section, re.S)


def _section(heading: str) -> str:
    start = README.index(f"## {heading}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_readme_is_a_short_manual():
    assert len(README.splitlines()) <= 150
    for heading in ("Install", "A first result", "The main job", "Scoring your own checkpoint",
                    "lm-evaluation-harness", "Submitting", "Python API"):
        assert f"\n## {heading}" in README


def test_the_second_setup_command_is_what_ci_runs():
    commands = [line for line in _fenced(_section("Install"))[0].splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("&& etbench score")
    assert commands[1].endswith("&& python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]


def test_first_result_command_is_the_one_the_benchmark_times():
    command = _fenced(_section("A first result"))[0].strip()
    bench = (ROOT / "tests" / "bench" / "bench_first_result.py").read_text()
    assert command == "etbench accuracy --model tiny-base --n 40"
    assert '"accuracy", "--model", "tiny-base"' in bench and '["--n", "40"]' in bench


def test_lm_eval_section_exports_and_names_real_tasks():
    section = _section("lm-evaluation-harness")
    code = _fenced(section)[0]
    assert "etbench models export tiny-base" in code and "pretrained=exported/tiny-base" in code
    task_names = set(re.findall(r"--tasks (\S+)", code))
    configs = [yaml.safe_load(p.read_text()) for p in (ROOT / "tasks" / "entity_tracking").glob("*.yaml")]
    declared = {c["task"] for c in configs if isinstance(c.get("task"), str)} | {c.get("group") for c in configs}
    assert task_names and task_names <= declared, task_names - declared
    test = (ROOT / "tests" / "integration" / "test_export_lm_eval.py").read_text()
    assert '"entity_tracking_7boxes"' in test and "LIMIT = 20" in test and "--limit 20" in code


def test_links_in_the_readme_and_its_docs_pages_resolve():
    pages = {ROOT / "README.md": README} | {ROOT / "docs" / n: (ROOT / "docs" / n).read_text() for n in DOCS}
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    for name in DOCS:
        assert f"docs/{name}" in README


def test_license_and_citation():
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    paper = cff["preferred-citation"]
    assert [a["family-names"] for a in paper["authors"]] == ["Prakash", "Shaham", "Haklay", "Belinkov", "Bau"]
    assert paper["year"] == 2024 and "2402.14811" in paper["url"] and "Entity Tracking" in paper["title"]
    assert cff["license"] == "MIT" and cff["type"] == "software"


def test_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", _section("Python API"), re.S).group(1)
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
