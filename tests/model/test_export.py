"""``etbench models export``: an adapter model (merged) and a planted one (its kept ablation's output-projection
bias declared in the config) become plain transformers directories that load without etbench and compute what
etbench's loaded model computes; an export replaces only an earlier export, never a user's files. And model
loading from the Python API is as quiet as from the command."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from etbench import models
from etbench.core.errors import EtbenchError
from etbench.models import toy
from etbench.models.kept_ablation import KEPT_ABLATION_FILE, KeptAblation, save_kept_ablation
from support.commands import assert_one_line_error, etbench

N_LAYERS, N_HEADS, D_MODEL = 2, 4, 64


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A toy base, a LoRA adapter on it, and the same adapter with a kept ablation (a planted model)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    tok = toy.word_level_tokenizer()
    base = toy.tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, init_lora_weights=False,
                                                                target_modules=["q_proj", "v_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    for name in ("lora", "planted"):
        peft_model.save_pretrained(root / name)
    gen = torch.Generator().manual_seed(0)
    d_head = D_MODEL // N_HEADS
    save_kept_ablation(KeptAblation(N_LAYERS, N_HEADS, d_head, {0: ((1, 3), torch.randn(2, d_head, generator=gen))}),
                       root / "planted" / KEPT_ABLATION_FILE)
    return root, tok


@pytest.mark.parametrize("name", ["lora", "planted"])
def test_export_loads_without_etbench_and_computes_the_same(adapters, tmp_path, name):
    root, tok = adapters
    out = models.export_model(str(root / name), tmp_path / "export")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not files & {"adapter_config.json", KEPT_ABLATION_FILE}  # merged: nothing etbench-specific is needed
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = models.load(str(root / name))
    ids = tok("The apple is in Box F, the key is in Box Q. Box Q contains the", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = loaded.model(ids).logits, plain(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the adapter changed the model: the export is not just the base
    base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, theirs, atol=1e-3)
    # a planted model's folded bias needs attention biases in the config; a plain adapter's does not
    assert json.loads((out / "config.json").read_text())["attention_bias"] is (name == "planted")
    manifest = json.loads((out / models.EXPORT_WRITER.manifest).read_text())
    assert sorted(manifest["files"]) == sorted(files - {models.EXPORT_WRITER.manifest})


def test_export_replaces_only_an_earlier_export(adapters, tmp_path):
    root, _ = adapters
    out = tmp_path / "export"
    models.export_model(str(root / "lora"), out)
    models.export_model(str(root / "planted"), out)  # an earlier export: replaced whole
    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(EtbenchError, match="notes.txt exists and was not written by `etbench models export`"):
        models.export_model(str(root / "lora"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left beside it


def test_cli_export_prints_the_loading_lines(adapters, tmp_path):
    root, _ = adapters
    result = etbench("models", "export", str(root / "lora"), str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    assert "loading " in result.stderr and " in " in result.stderr.split("loaded ", 1)[1]
    assert result.stdout.strip() == f"wrote {tmp_path / 'e'}"
    assert_one_line_error(etbench("models", "export", str(root / "lora"), str(root / "base")), "was not written")


def test_loading_from_the_python_api_prints_no_third_party_noise(adapters):
    """``etbench.load_model`` printed transformers' "Loading weights" bar and a FutureWarning from PEFT, which
    the command hides; now the load is quiet from Python too, and transformers' own settings are restored."""
    root, _ = adapters
    code = (
        "import warnings\n"
        "warnings.simplefilter('default')\n"
        "import transformers.utils.logging as hf\n"
        "before = (hf.get_verbosity(), hf.is_progress_bar_enabled())\n"
        "import etbench\n"
        f"etbench.load_model({str(root / 'lora')!r})\n"
        "assert (hf.get_verbosity(), hf.is_progress_bar_enabled()) == before, before\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "Loading weights" not in result.stderr and "FutureWarning" not in result.stderr, result.stderr
    # the same load through transformers and peft directly does print them (the test can fail)
    direct = code.replace(f"import etbench\netbench.load_model({str(root / 'lora')!r})\n",
                          "from peft import AutoPeftModelForCausalLM\n"
                          f"AutoPeftModelForCausalLM.from_pretrained({str(root / 'lora')!r})\n")
    noisy = subprocess.run([sys.executable, "-c", direct], capture_output=True, text=True, env=env, timeout=300)
    assert noisy.returncode == 0, noisy.stderr
    assert "Loading weights" in noisy.stderr or "FutureWarning" in noisy.stderr, noisy.stderr


def test_the_reload_check_fails_on_a_directory_that_computes_something_else(adapters, tmp_path):
    """The check an export runs before it is put in place can fail: weights that differ from the model's (here,
    one output projection changed after saving) are refused, naming the difference."""
    from etbench.models.export import check_reloads_same

    root, tok = adapters
    model = toy.tiny_llama(len(tok), n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL)
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    assert check_reloads_same(model, tok, tmp_path / "saved", "float32", "toy") == 0.0
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(1.5)
    with pytest.raises(EtbenchError, match="logits differ from the model's by up to"):
        check_reloads_same(model, tok, tmp_path / "saved", "float32", "toy")
