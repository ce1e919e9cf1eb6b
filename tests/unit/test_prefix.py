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


def _dynamic_prefix(kv, rows, start):
    """The cache ``prefix_cache`` built before its layers were prefilled: a plain ``DynamicCache`` of the prefix."""
    from transformers import DynamicCache

    from etbench.mech.prefix import StoredRows

    if isinstance(kv, StoredRows):
        rows, kv = kv.rows[rows], kv.store
    return DynamicCache(ddp_cache_data=[(k[rows, :, :start], v[rows, :, :start]) for k, v in kv])


def test_prefilled_prefix_runs_are_bitwise_those_of_a_dynamic_cache(monkeypatch):
    """Patched runs over the prefilled prefix (tokens written in place) give exactly the logits, and the
    gradient, of runs over a plain ``DynamicCache`` prefix (which copies the prefix per run), for rows that
    repeat and starts that differ."""
    import etbench.mech.prefix as prefix
    from etbench.mech.interventions import replace
    from etbench.models.toy import tiny_llama

    model = tiny_llama(50, n_layers=3, n_heads=4, n_kv_heads=2, seed=1)
    ids = torch.randint(4, 50, (6, 11), generator=torch.Generator().manual_seed(0))
    runner = prefix.PatchRunner(model, ids, batch_size=4)
    rows = torch.tensor([3, 1, 1, 5, 0])
    values = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def edits(sub, shift):
        return [replace(1, "z", values[rows[sub]], torch.full((len(sub),), 9 - shift), [0, 3])]

    def run():
        logits = runner.logits(rows, runner.stored(rows), torch.tensor([6, 6, 9, 3, 9]), edits)
        return logits.detach(), torch.autograd.grad(logits[:, 7].sum(), values)[0]

    got = run()
    assert isinstance(prefix.prefix_cache(runner.stored(rows), runner.windows, torch.arange(2), 4).layers[0],
                      prefix._prefilled_layer_class())
    monkeypatch.setattr(prefix, "prefix_cache", lambda kv, windows, sub, start: _dynamic_prefix(kv, sub, start))
    want = run()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].abs().sum() > 0  # the patch reaches the logits: the comparison is not between constants


def test_an_extendable_prefix_serves_run_after_run_and_a_longer_run_falls_back_to_appending():
    """``extendable``: suffix runs cropped back after each give what a fresh ``DynamicCache`` of the prefix
    gives, run after run (the prefix is never overwritten); a run that does not end at the buffer's length
    appends as ``DynamicLayer`` does."""
    from transformers import DynamicCache

    from etbench.mech.prefix import extendable
    from etbench.models.toy import tiny_llama

    model = tiny_llama(50, n_layers=2, n_heads=4, seed=3)
    ids = torch.randint(4, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :6], use_cache=True).past_key_values
        fresh = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.layers]
        kv = extendable(prefix, 10)
        for shift in (0, 7, 0):  # different suffix tokens each run
            suffix = (ids[:, 6:] + shift) % 50
            got = model(input_ids=suffix, past_key_values=kv, use_cache=True).logits
            kv.crop(-4)
            want = model(input_ids=suffix, past_key_values=DynamicCache(ddp_cache_data=fresh), use_cache=True).logits
            assert torch.equal(got, want)
        longer = model(input_ids=ids[:, 6:9], past_key_values=kv, use_cache=True).logits  # ends at 9, not 10
        want = model(input_ids=ids[:, 6:9], past_key_values=DynamicCache(ddp_cache_data=fresh), use_cache=True).logits
        assert torch.equal(longer, want)
