"""etbench.prefix: grouping rows by where their patch starts."""

import torch

from etbench.mech.prefix import start_buckets


def test_start_buckets_cover_every_row_once_and_never_start_after_a_row():
    starts = torch.tensor([5, 3, 9, 3, 7, 5, 12, 1])
    for max_splits in (1, 2, 3, 8, 20):
        buckets = start_buckets(starts, max_splits)
        assert len(buckets) <= max(max_splits, 1)
        rows = torch.cat([sub for sub, _ in buckets])
        assert sorted(rows.tolist()) == list(range(len(starts)))
        for sub, start in buckets:
            assert start == int(starts[sub].min())  # a bucket runs from its earliest row's start
    # few distinct starts: one bucket per start, rows in their original order
    assert [(sub.tolist(), s) for sub, s in start_buckets(torch.tensor([4, 2, 4, 2]), 8)] == [([1, 3], 2), ([0, 2], 4)]


def test_a_sparse_run_attends_causally_over_the_cache_and_its_own_tokens():
    """Tokens fed at positions 2 and 5 of a 6-token row, over a cache of positions 0, 1, 3, 4: each attends to
    the cached positions before it and to the fed tokens up to itself, never to a later position."""
    import torch

    from etbench.mech.prefix import sparse_cache, sparse_mask

    fed = torch.tensor([[2, 5], [0, 5]])
    keys = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 1, 6, 1)  # [b, heads, T, d]: key = position id
    cache, kept = sparse_cache([(keys, keys.clone())], fed)
    assert kept.tolist() == [[0, 1, 3, 4], [1, 2, 3, 4]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1, 3, 4], [7, 8, 9, 10]]
    mask = sparse_mask(kept, fed)[:, 0]  # [b, P, K + P]
    assert mask[0].tolist() == [[True, True, False, False, True, False], [True, True, True, True, True, True]]
    assert mask[1].tolist() == [[False, False, False, False, True, False], [True, True, True, True, True, True]]
