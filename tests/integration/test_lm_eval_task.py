"""The lm-eval task end to end: found from the checkout and from the installed package, valid,
deterministic, and its 7-box acc equals `etbench accuracy` item by item on the same model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from etbench.metrics import accuracy
from etbench.models import toy
from etbench.task import prompts as data
from etbench.task.harness import TASK_GROUPS, task_manager, tasks_dir

REPO = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_task_yamls_restate_the_canonical_item_set():
    for path in sorted((REPO / "tasks" / "entity_tracking").glob("entity_tracking_*boxes.yaml")):
        kwargs = yaml.safe_load(path.read_text())["dataset_kwargs"]
        assert kwargs["et_n"] == data.CANONICAL_N and kwargs["et_seed"] == data.CANONICAL_SEED
        assert path.name.endswith(f"_{kwargs['et_n_boxes']}boxes.yaml")


def test_package_tasks_dir_is_the_checkout_tasks_dir():
    assert tasks_dir().resolve() == (REPO / "tasks").resolve()


def test_task_manager_indexes_groups_and_subtasks():
    names = set(task_manager(include_defaults=False).all_tasks)
    assert set(TASK_GROUPS) <= names
    assert {f"entity_tracking_{n}boxes" for n in (3, 5, 7)} <= names
    assert {f"entity_tracking_mc_{n}boxes" for n in (3, 5, 7)} <= names


def test_documents_are_deterministic_and_fewshot_pool_is_disjoint():
    sys.path.insert(0, str(REPO / "tasks" / "entity_tracking"))
    import utils  # the task's own utils.py

    a, b = utils.build_dataset(et_n_boxes=7, et_n=500, et_seed=0), utils.build_dataset(7, 500, 0, pretrained="x")
    assert a["test"].to_list() == b["test"].to_list() == [e.to_record() for e in data.generate(7, 500, 0)]
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["test"]}


def lm_eval(*args, cwd):
    import os

    return subprocess.run([*args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **OFFLINE})


@pytest.mark.slow
def test_lm_eval_validate_accepts_the_task(tmp_path):
    result = lm_eval(sys.executable, "-m", "lm_eval", "validate", "--tasks", "entity_tracking,entity_tracking_mc",
                     "--include_path", str(REPO / "tasks"), cwd=tmp_path)
    assert result.returncode == 0 and "All tasks found and valid" in result.stdout + result.stderr


@pytest.mark.slow
def test_lm_eval_acc_equals_etbench_accuracy_item_by_item(tmp_path):
    model_dir = toy.save_toy_model(tmp_path / "toy", seed=3)
    out = tmp_path / "lm_eval_out"
    result = lm_eval(sys.executable, "-m", "lm_eval", "--include_path", str(REPO / "tasks"), "--tasks", "entity_tracking",
                     "--model", "hf", "--model_args", f"pretrained={model_dir}", "--device", "cpu",
                     "--batch_size", "32", "--output_path", str(out), "--log_samples", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "entity_tracking" in result.stdout and "7 boxes" in result.stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["limit"] is None
    samples = [json.loads(line) for line in next(out.rglob("samples_entity_tracking_7boxes_*.jsonl")).open()]
    samples.sort(key=lambda s: s["doc_id"])
    assert len(samples) == data.CANONICAL_N

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = accuracy.evaluate(model, AutoTokenizer.from_pretrained(model_dir), data.generate(7), progress=False)
    assert [bool(int(s["acc"])) for s in samples] == [item.correct for item in ours.items]
    # Same tokens at the same position: the log-likelihoods agree, not just the verdicts.
    lm_eval_ll = [float(s["resps"][0][0][0]) for s in samples]
    assert lm_eval_ll == pytest.approx([item.target_logprob for item in ours.items], abs=1e-4)
    assert results["results"]["entity_tracking_7boxes"]["acc,none"] == pytest.approx(ours.accuracy, abs=1e-12)


@pytest.mark.slow
def test_installed_package_route_without_checkout(tmp_path):
    # From an unrelated directory, the pass-through finds the packaged tasks on its own.
    result = lm_eval(sys.executable, "-m", "etbench.cli", "lm-eval", "validate", "--tasks", "entity_tracking",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All tasks found and valid" in result.stdout + result.stderr
