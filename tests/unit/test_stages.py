"""Resumable stage cache and per-stage peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from etbench.scoring.stages import StageCache, _rss_mb


def test_stage_runs_once_and_recomputes_when_its_inputs_change(tmp_path):
    calls = []

    def compute(x):
        calls.append(x)
        return {"value": x, "tuple": (1, 2)}

    cache = StageCache(tmp_path)
    first = cache.run("double", {"x": 2}, lambda: compute(2))
    assert first == {"value": 2, "tuple": [1, 2]}  # what a resumed run reads back, not the in-memory tuple
    again = StageCache(tmp_path)
    assert again.run("double", {"x": 2}, lambda: compute(99)) == first and calls == [2]
    assert again.ran == [] and again.timings == {}
    assert again.run("double", {"x": 3}, lambda: compute(3)) == {"value": 3, "tuple": [1, 2]}
    assert calls == [2, 3] and again.ran == ["double"] and set(again.peak_rss_mb) == {"double"}
    stored = json.loads((tmp_path / "double.json").read_text())
    assert set(stored) == {"key", "result", "checksum"}  # the checksum detects an edited result


def test_a_corrupt_stage_file_is_recomputed(tmp_path):
    cache = StageCache(tmp_path)
    cache.run("s", {}, lambda: 1)
    (tmp_path / "s.json").write_text("{not json")
    assert StageCache(tmp_path).run("s", {}, lambda: 2) == 2


def test_peak_memory_sees_an_allocation_inside_the_block():
    """In a fresh interpreter (so no freed-but-resident memory can absorb it), 300 MB written inside
    the block shows in its peak, and is gone from the process by the end."""
    if _rss_mb() is None:
        pytest.skip("no /proc: only the lifetime peak (ru_maxrss) is available")
    code = (
        "import time\n"
        "from etbench.scoring.stages import PeakMemory, _rss_mb\n"
        "before = _rss_mb()\n"
        "with PeakMemory(interval=0.01) as mem:\n"
        "    block = b'x' * (300 * 2**20)\n"
        "    time.sleep(0.1)\n"
        "    del block\n"
        "print(before, mem.peak_mb, _rss_mb())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, peak, after = map(float, out.split())
    assert peak >= before + 250 and after < peak - 250


def test_each_score_many_side_visits_its_own_stage_first():
    # Under score-many the ft side used to wait for circuit_base before starting circuit_ft, so the two
    # circuit stages (the longest) ran one after the other.
    from etbench.scoring.distributed import side_plan
    from etbench.scoring.pipeline import SIDES, side_order

    templates = ("accuracy_{}", "circuit_{}", "faithfulness_{}", "dcm_{}_seed0")
    for template in templates:
        assert side_order(template, None) == SIDES == ("base", "ft")
        assert side_order(template, lambda name: side_plan("base", name)) == ("base", "ft")
        assert side_order(template, lambda name: side_plan("ft", name)) == ("ft", "base")
    # semantics and CMAP belong to the ft side: both sides keep the listed order there
    assert side_order("semantics_{}", lambda name: side_plan("ft", name)) == ("base", "ft")
