"""etbench.dcm: a planted answer is recovered, the fast paths equal the plain computation, seeding,
the semantics check and input validation. Tiny models only (seconds on 2 cores)."""


from __future__ import annotations

import pytest

from etbench.core.errors import EtbenchError
from etbench.metrics import dcm


def test_additional_desiderata_only_for_position_transmitter():
    cfg = dcm.DcmConfig(additional_for=("B",))
    assert len(cfg.desiderata_for("position_transmitter")) == 14
    assert cfg.desiderata_for("A") == ("positional", "object_value", "box_label_value")
    assert dcm.dcm_preset("paper").n_train == 1000 and dcm.dcm_preset("paper").lr == 0.1 and dcm.dcm_preset("paper").lam == 0.01


@pytest.mark.parametrize("name", sorted(dcm.DCM_PRESETS))
def test_every_preset_can_patch_a_head(name):
    """Adam moves a mask from 1 by about lr per step, and a head counts as patched below 0.5: a preset
    with steps x lr < 1 could barely (or, below 0.5, never) select a head. The first quick preset had
    4 steps at lr 0.1 and selected no head on the tiny pair."""
    cfg = dcm.dcm_preset(name)
    assert cfg.steps * cfg.lr >= 1.0, (cfg.steps, cfg.lr)


@pytest.mark.parametrize("changes, match", [
    (dict(n_train=0), "n_train"),
    (dict(lr=0), "lr"),
    (dict(desiderata=("nonsense",)), "unknown desideratum"),
    (dict(additional_for=("Z",)), "unknown circuit group"),
])
def test_config_errors(changes, match):
    with pytest.raises(EtbenchError, match=match):
        dcm.DcmConfig(**changes)


def test_heads_are_copied_not_aliased():
    a = [(1, 0)]
    out = dcm.normalise_heads({"A": a, "B": a})
    a.append((1, 1))
    assert out == {"value_fetcher": ((1, 0),), "position_transmitter": ((1, 0),)}
