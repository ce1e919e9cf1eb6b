"""The README's lm-eval route for a shipped model: `etbench models export tiny-base DIR`, then lm-eval's own `hf`
model on DIR, offline, with --limit. lm-eval's per-item verdicts on the 7-box task equal etbench's on the alias."""

import json
import os
import subprocess
import sys

import pytest

from etbench.metrics import accuracy
from etbench.models import load
from etbench.task import prompts as data
from support.commands import etbench

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LIMIT = 20


@pytest.mark.slow
def test_lm_eval_runs_offline_on_an_exported_shipped_model(tmp_path):
    export = etbench("models", "export", "tiny-base", str(tmp_path / "tiny-base"))
    assert export.returncode == 0, export.stderr
    tasks = etbench("tasks-path").stdout.strip()
    out = tmp_path / "lm_eval_out"
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'tiny-base'}",
         "--tasks", "entity_tracking_7boxes", "--include_path", tasks, "--limit", str(LIMIT), "--device", "cpu",
         "--batch_size", "8", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, env={**os.environ, **OFFLINE})
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in next(out.rglob("samples_entity_tracking_7boxes_*.jsonl")).open()]
    samples.sort(key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))

    loaded = load("tiny-base")
    ours = accuracy.evaluate(loaded.model, loaded.tokenizer, data.generate(7)[:LIMIT], progress=False)
    assert [bool(int(s["acc"])) for s in samples] == [item.correct for item in ours.items]
    assert [float(s["resps"][0][0][0]) for s in samples] == pytest.approx(
        [item.target_logprob for item in ours.items], abs=1e-3)
