"""etbench.prefix: grouping rows by where their patch starts."""

import torch

from etbench.mech.prefix import _buckets


def test_buckets_cover_every_row_once_and_never_start_after_a_row():
    starts = torch.tensor([5, 3, 9, 3, 7, 5, 12, 1])
    for max_splits in (1, 2, 3, 8, 20):
        buckets = _buckets(starts, max_splits)
        assert len(buckets) <= max(max_splits, 1)
        rows = torch.cat([sub for sub, _ in buckets])
        assert sorted(rows.tolist()) == list(range(len(starts)))
        for sub, start in buckets:
            assert start == int(starts[sub].min())  # a bucket runs from its earliest row's start
    # few distinct starts: one bucket per start, rows in their original order
    assert [(sub.tolist(), s) for sub, s in _buckets(torch.tensor([4, 2, 4, 2]), 8)] == [([1, 3], 2), ([0, 2], 4)]
