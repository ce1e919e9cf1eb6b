"""Memory is estimated from the config before any weight is read, and a model that cannot fit fails
in one line; dtype defaults to bfloat16 on CUDA only."""

import json

import pytest

from etbench import models
from etbench.core.errors import EtbenchError


def _config_only(directory, hidden, layers, vocab=32000):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": int(hidden * 2.6875), "num_attention_heads": 32, "num_key_value_heads": 32,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048}))
    return directory


def test_estimate_counts_parameters_from_the_config(tmp_path):
    spec = models.resolve(str(_config_only(tmp_path / "llama7b", 4096, 32)))
    est = models.estimate_memory(spec, "bfloat16", "cpu")
    assert est.parameters == 6_738_415_616  # Llama-7B's count, from the config alone
    assert est.weights_gb == pytest.approx(6_738_415_616 * 2 / 2**30)
    assert est.activations_gb > 0 and "6.74 B parameters" in est.line("llama7b", "bfloat16")
    assert models.estimate_memory(spec, "float32", "cpu").weights_gb == pytest.approx(2 * est.weights_gb)


def test_a_model_that_cannot_fit_fails_before_loading(tmp_path):
    huge = _config_only(tmp_path / "huge", 16384, 96)  # ~310 B parameters, ~1.2 TB in fp32; no weights on disk
    with pytest.raises(EtbenchError, match="does not fit: ~.* GB needed .* GB free on this machine"):
        models.load(str(huge))


def test_default_dtype():
    assert models.default_dtype("cpu") == "float32"
