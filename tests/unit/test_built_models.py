"""Registry entries of kind ``built`` (weights built on first use and checked against a recorded sha256):
validation before anything loads, the hash check, caching, and missing sources. The builder here is a
stand-in module writing two small tensors (no model, no training)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from etbench import models
from etbench.core.errors import EtbenchError

BUILDER = "etbench.zoo_test_builder"
TENSORS = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(3)}


@pytest.fixture
def builder(monkeypatch, tmp_path):
    """A builder module (importable by name, like a real one) that counts its builds."""
    module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(BUILDER, None))
    module.calls = []

    def build(alias, directory, log):
        module.calls.append(alias)
        save_file(TENSORS, str(directory / "model.safetensors"))
        (directory / "config.json").write_text("{}")

    module.build = build
    monkeypatch.setitem(sys.modules, BUILDER, module)
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path / "cache"))
    return module


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def _expected_hash(tmp_path) -> str:
    path = tmp_path / "reference"
    path.mkdir(exist_ok=True)
    save_file(TENSORS, str(path / "model.safetensors"))
    return models.weights_sha256(path)


def _entries(base, sha256, builder=BUILDER, **extra):
    raw = {"kind": "built", "base": str(base), "builder": builder, "sha256": sha256, "description": "d", **extra}
    return models.parse_registry({"schema_version": 1, "models": {"built-one": raw}})


@pytest.mark.parametrize("change, message", [
    ({"sha256": None}, "missing sha256"),
    ({"sha256": "abc"}, "64 lowercase hex"),
    ({"sha256": "A" * 64}, "64 lowercase hex"),
    ({"builder": "os.path"}, "must be an etbench module"),
    ({"builder": "etbench"}, "must be an etbench module"),
    ({"builder": None}, "missing base, builder|missing builder"),
    ({"adapter": "asset:x"}, "keys of another kind"),
])
def test_built_entries_are_validated_when_the_registry_is_read(change, message, base_dir):
    raw = {"kind": "built", "base": str(base_dir), "builder": BUILDER, "sha256": "0" * 64, "description": "d"}
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(EtbenchError, match=message):
        models.parse_registry({"schema_version": 1, "models": {"x": raw}})


def test_a_built_base_cycle_is_refused():
    doc = {"schema_version": 1, "models": {
        "a": {"kind": "built", "base": "b", "builder": BUILDER, "sha256": "0" * 64, "description": "d"},
        "b": {"kind": "built", "base": "a", "builder": BUILDER, "sha256": "1" * 64, "description": "d"}}}
    with pytest.raises(EtbenchError, match="base cycle"):
        models.parse_registry(doc)


def test_weights_hash_is_of_tensors_not_files(tmp_path):
    one, two, changed = tmp_path / "one", tmp_path / "two", tmp_path / "changed"
    for path in (one, two, changed):
        path.mkdir()
    save_file(TENSORS, str(one / "model.safetensors"))
    save_file({"b.weight": TENSORS["b.weight"]}, str(two / "model-00001.safetensors"), metadata={"x": "y"})
    save_file({"a.bias": TENSORS["a.bias"]}, str(two / "model-00002.safetensors"))
    save_file({**TENSORS, "a.bias": TENSORS["a.bias"] + 1e-7}, str(changed / "model.safetensors"))
    assert models.weights_sha256(one) == models.weights_sha256(two)
    assert models.weights_sha256(one) != models.weights_sha256(changed)
    with pytest.raises(EtbenchError, match="no \\*.safetensors"):
        models.weights_sha256(tmp_path)


def test_first_use_builds_verifies_and_caches(builder, base_dir, tmp_path):
    digest = _expected_hash(tmp_path)
    entries = _entries(base_dir, digest)
    spec = models.resolve("built-one", entries)
    assert spec.kind == "built" and spec.base.kind == "directory"
    assert models.spec_revision(spec) == "sha256:" + digest
    assert models.published_source(spec) == f"built:{BUILDER} + local:base"
    status = models.availability(spec)
    assert status.ok and "first load builds it" in status.why
    path = models.ensure_built("built-one", entries)
    assert builder.calls == ["built-one"] and path == models.built_dir(entries["built-one"])
    assert json.loads((path / models.BUILT_MANIFEST).read_text())["sha256"] == digest
    assert models.ensure_built("built-one", entries) == path and builder.calls == ["built-one"]  # cached
    assert models.availability(spec).why.startswith("built and verified")


def test_a_hash_mismatch_fails_in_one_line_and_caches_nothing(builder, base_dir, tmp_path):
    digest = _expected_hash(tmp_path)
    recorded = "f" * 64
    entries = _entries(base_dir, recorded)
    with pytest.raises(EtbenchError) as err:
        models.ensure_built("built-one", entries)
    text = str(err.value)
    assert "\n" not in text and digest in text and recorded in text
    cache = models.built_dir(entries["built-one"]).parent
    assert list(cache.iterdir()) == []  # the rejected build is gone, no temporary left
    assert builder.calls == ["built-one"]


def test_missing_builder_or_base_fails_before_any_build(builder, base_dir, tmp_path):
    entries = _entries(base_dir, "0" * 64, builder="etbench.no_such_builder_module")
    status = models.availability(models.resolve("built-one", entries))
    assert not status.ok and "builder etbench.no_such_builder_module is not installed" in status.why
    with pytest.raises(EtbenchError, match="cannot be built: .*not installed"):
        models.ensure_built("built-one", entries)
    doc = {"schema_version": 1, "models": {
        "gone": {"kind": "gguf", "package": "no_such_gguf_package", "file": "x.gguf", "description": "d",
                 "install": "pip install no-such"},
        "built-one": {"kind": "built", "base": "gone", "builder": BUILDER, "sha256": "0" * 64, "description": "d"}}}
    entries = models.parse_registry(doc)
    with pytest.raises(EtbenchError, match="cannot be built: base gone .*no_such_gguf_package is not installed"):
        models.ensure_built("built-one", entries)
    with pytest.raises(EtbenchError, match="is not available"):
        models.load("built-one", entries=entries)
    assert builder.calls == []


def test_shipped_float_row_is_a_built_entry():
    entry = models.registry()["tiny-float"]
    assert entry.kind == "built" and entry.base == "tiny-base" and entry.builder == "etbench.training.zoo"
    assert importlib.util.find_spec(entry.builder) is not None
