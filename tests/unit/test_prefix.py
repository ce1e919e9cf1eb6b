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


def test_stored_rows_give_the_same_prefix_as_copied_rows():
    """``StoredRows`` (rows of a store, repeats allowed, not copied) and the copied rows give the same cache."""
    from etbench.mech.prefix import StoredRows, prefix_cache

    g = torch.Generator().manual_seed(0)
    store = [(torch.randn(6, 2, 9, 4, generator=g), torch.randn(6, 2, 9, 4, generator=g)) for _ in range(3)]
    rows = torch.tensor([4, 1, 1, 5, 0])
    copied = [(k[rows], v[rows]) for k, v in store]
    sub = torch.tensor([3, 1, 2])
    a = prefix_cache(StoredRows(store, rows), [None] * 3, sub, 7)
    b = prefix_cache(copied, [None] * 3, sub, 7)
    for la, lb, (k, _) in zip(a.layers, b.layers, store):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        assert torch.equal(la.keys, k[torch.tensor([5, 1, 1])][:, :, :7])


def test_packed_keeps_order_and_the_row_limit():
    from etbench.mech.prefix import packed

    sizes = [3, 4, 2, 9, 1, 1]
    groups = packed(sizes, lambda n: n, 8)
    assert [x for g in groups for x in g] == sizes  # every item once, in order
    assert groups == [[3, 4], [2], [9], [1, 1]]  # within 8 rows, except an item larger than that alone
