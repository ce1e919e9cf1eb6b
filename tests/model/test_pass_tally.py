"""Forward-pass accounting (``interventions.tallying``): what a stage's ``passes`` in timings.json count."""

from __future__ import annotations

import torch

from etbench.mech.heads import head_map
from etbench.mech.interventions import Site, cache, count_backward, mix, replace, run, tallying
from etbench.models import toy


def test_tally_counts_forward_and_backward_tokens_and_repeated_unpatched_rows():
    model = toy.tiny_llama(40, n_layers=2, n_heads=4, d_model=32)
    hm = head_map(model)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    with tallying() as outer:
        with torch.no_grad(), tallying() as first:
            run(model, None, {"input_ids": ids})
            cache(model, hm, {"input_ids": ids[:1]}, [Site(0)])  # a read: the same computation, row 0 again
            run(model, hm, {"input_ids": ids}, [replace(0, "z", torch.zeros(4, 8), heads=[0, 1, 2, 3])])  # patched
        with tallying() as second:
            with torch.no_grad():
                run(model, None, {"input_ids": ids[1:]})  # repeats row 1 of the outer tally's first call
                run(model, None, {"input_ids": torch.tensor([[1, 2, 3]])})  # new tokens
                run(model, None, {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)})  # again
                run(model, None, {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[0, 1, 1]])})
                past = run(model, None, {"input_ids": ids[:1]}, use_cache=True).past_key_values
                run(model, None, {"input_ids": torch.tensor([[11]])}, past_key_values=past)  # a continuation
            mask = torch.ones(4, requires_grad=True)
            out = run(model, hm, {"input_ids": ids}, [mix(1, "z", torch.zeros(4, 8), mask, positions=[4, 4])])
            torch.autograd.grad(out.logits[:, -1, 0].sum(), [mask])
            count_backward()
    assert first.as_dict() == {"calls": 3, "forward_tokens": 25, "backward_tokens": 0, "repeated_tokens": 5}
    assert second.as_dict() == {"calls": 7, "forward_tokens": 5 + 3 + 3 + 3 + 5 + 1 + 10, "backward_tokens": 10,
                                "repeated_tokens": 5 + 3 + 5}  # a mask of ones is no padding: the same run
    assert outer.as_dict() == {k: first.as_dict()[k] + second.as_dict()[k] for k in outer.as_dict()}
