"""The diffing view's known answer on a real zoo row: tiny-planted-a was trained with tiny-base's 54 value
fetchers mean-ablated at every position, so no gradient reached their query rows: its weight change is exactly
zero on those heads' W_Q (and on the KV heads all of whose query heads were ablated), and nowhere else."""

from __future__ import annotations

import pytest

from etbench import models
from etbench.mech.heads import head_map, head_weight_slices
from etbench.training.zoo import PLANTED_A_HEADS

_BASE = models.availability(models.resolve("tiny-base"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _BASE.ok, reason=f"tiny-base is not available: {_BASE.why}")]


def test_planted_row_leaves_exactly_the_ablated_heads_queries_unchanged():
    base, planted = models.load("tiny-base").model, models.load("tiny-planted-a").model
    hm_b, hm_p = head_map(base), head_map(planted)
    spec = hm_b.spec
    knocked = set(PLANTED_A_HEADS)
    for layer in range(spec.n_layers):
        dq = (head_weight_slices(hm_p, layer, "q") - head_weight_slices(hm_b, layer, "q")).abs().amax(dim=(1, 2))
        assert [h for h in range(spec.n_heads) if dq[h] == 0] == [h for h in range(spec.n_heads) if (layer, h) in knocked]
        dk = (head_weight_slices(hm_p, layer, "k") - head_weight_slices(hm_b, layer, "k")).abs().amax(dim=(1, 2))
        for g in range(spec.n_kv_heads):
            assert (dk[g] == 0) == all((layer, h) in knocked for h in spec.query_heads(g))
