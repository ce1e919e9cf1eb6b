"""The planted trainer's output directory is never an adapter without its kept ablation (stand-ins, no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from etbench.models.kept_ablation import KEPT_ABLATION_FILE, KeptAblation
from etbench.training import planted


class Interrupted(Exception):
    pass


def test_an_interrupted_save_never_leaves_an_adapter_without_its_kept_ablation(tmp_path, monkeypatch):
    # An adapter directory without kept_ablation.safetensors loads as a plain LoRA on the intact base: the
    # planted model's known answer would be gone without a word. Interrupt the run right after the adapter
    # is written (the fp16 conversion) and look at what is on disk.
    ablation = KeptAblation(2, 2, 3, {1: ((0,), torch.zeros(1, 3))})
    monkeypatch.setattr(planted.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(planted.torch, "use_deterministic_algorithms", lambda on: None)
    monkeypatch.setattr(planted.models, "load", lambda ref: SimpleNamespace(model=object(), tokenizer=object()))
    monkeypatch.setattr(planted, "head_map", lambda model: SimpleNamespace(spec=SimpleNamespace(n_heads=2)))
    monkeypatch.setattr(planted, "monitor_examples", lambda: [])
    monkeypatch.setattr(planted, "monitor_accuracy", lambda model, tokenizer, examples: 0.5)
    monkeypatch.setattr(planted, "kept_ablation", lambda model, tokenizer, kept: ablation)
    monkeypatch.setattr(planted, "fold_kept_ablation", lambda model, abl: None)
    monkeypatch.setattr(planted, "train_stage", lambda *args, **kwargs: (object(), {}))

    def save_adapter(peft_model, directory, base_ref):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_config.json").write_text('{"target_modules": ["q_proj"]}')
        (directory / "adapter_model.safetensors").write_bytes(b"weights")

    def interrupted(path):
        raise Interrupted

    monkeypatch.setattr(planted, "save_adapter", save_adapter)
    monkeypatch.setattr(planted, "_to_half", interrupted)
    with pytest.raises(Interrupted):
        planted.train(tmp_path, log=lambda line: None)
    out = tmp_path / planted.ADAPTER_NAME
    if (out / "adapter_model.safetensors").exists():
        assert (out / KEPT_ABLATION_FILE).is_file()


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--lr", "0"], ["--lr", "nan"], ["--lr", "-1e-3"],
                                  ["--monitor-every", "-1"]])
def test_bad_training_options_are_refused_before_anything_loads(argv, monkeypatch, capsys):
    # the default --out is the shipped adapter: a run with 0 steps or lr 0 would replace it with an untrained one
    def train(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(planted, "train", train)
    with pytest.raises(SystemExit) as exit_info:
        planted.main(argv)
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err
