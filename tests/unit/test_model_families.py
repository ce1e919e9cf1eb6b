"""The trained model families (etbench.training.tiny): each stage is a registry alias whose adapter ships
in the package, on the right base, small, and without the (Gemma: 262k-row) embedding."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from etbench import models
from etbench.training import tiny
from etbench.training.tiny import FAMILIES, GEMMA, TINY, WORDINGS
from etbench.training.zoo import ROW_BY_NAME

STAGES = [(family, stage) for family in FAMILIES.values() for stage in family.stages]


@pytest.mark.parametrize("family,stage", STAGES, ids=[stage.name for _, stage in STAGES])
def test_every_stage_is_a_registry_alias_on_its_parent(family, stage):
    entry = models.registry()[stage.name]
    assert entry.kind == "peft" and entry.base == family.parent_ref(stage)
    assert entry.adapter == f"asset:{family.name}/{stage.name}"
    # a stage that others train on is merged at load, as it was merged when they were trained
    assert entry.merge == any(other.parent == stage.name for other in family.stages)
    assert stage.wording in WORDINGS


@pytest.mark.parametrize("family,stage", STAGES, ids=[stage.name for _, stage in STAGES])
def test_shipped_adapter_is_small_and_has_no_embedding(family, stage):
    directory = family.asset_dir / stage.name
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == family.parent_ref(stage)
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not config.get("modules_to_save")
    path = directory / "adapter_model.safetensors"
    assert path.stat().st_size < 8_000_000
    with safe_open(str(path), "pt") as handle:
        names = list(handle.keys())
        dtypes = {str(handle.get_slice(n).get_dtype()) for n in names}
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert dtypes == {"F16" if family.adapter_dtype.itemsize == 2 else "F32"}


def test_families_order_parents_first_and_share_the_recipe():
    for family in FAMILIES.values():
        seen = set()
        for stage in family.stages:
            assert stage.parent is None or stage.parent in seen
            seen.add(stage.name)
    # the second family repeats the first one's base and crate stages, and adds arithmetic and transfer ones
    assert [s.wording for s in TINY.stages] == [s.wording for s in GEMMA.stages][:2]
    assert {s.wording for s in GEMMA.stages} == set(WORDINGS)


@pytest.mark.parametrize("stage,tiny_row", [("gemma-goat", "tiny-goat"), ("gemma-code", "tiny-code"),
                                            ("gemma-kv", "tiny-kv")])
def test_second_family_transfer_stages_repeat_the_tiny_zoo_rows_recipe_and_data(stage, tiny_row):
    """A gemma row and its tiny row differ only in the base: same data kind, stream seed, steps and lr, so the
    two families' transfer attempts train on the same problems and prompts."""
    mine = tiny.zoo_row(next(s for s in GEMMA.stages if s.name == stage))
    theirs = ROW_BY_NAME[tiny_row]
    assert (mine.data, mine.seed, mine.steps, mine.lr, mine.objective) == \
        (theirs.data, theirs.seed, theirs.steps, theirs.lr, theirs.objective)


def test_unknown_stage_is_a_usage_error_before_anything_loads(capsys, monkeypatch):
    monkeypatch.setattr(tiny, "train", lambda *a, **k: pytest.fail("trained despite an unknown stage"))
    with pytest.raises(SystemExit) as exit_info:
        tiny.main(["--family", "gemma", "--stages", "gemma-bse"])
    assert exit_info.value.code == 2
    assert "gemma-bse not in family gemma" in capsys.readouterr().err
