"""Registry, resolution, availability and error messages of etbench.models (no real models)."""


from __future__ import annotations

import json

from etbench import models


def test_resolve_local_directory(toy_model_dir):
    spec = models.resolve(str(toy_model_dir))
    assert spec.kind == "directory" and spec.location == str(toy_model_dir)


def test_resolve_adapter_directory_reads_its_base(tmp_path, toy_model_dir):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(toy_model_dir)}))
    spec = models.resolve(str(tmp_path))
    assert spec.kind == "peft" and spec.location == str(tmp_path)
    assert spec.base.kind == "directory" and spec.base.location == str(toy_model_dir)
