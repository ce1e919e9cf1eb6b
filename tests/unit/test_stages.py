"""Resumable stage cache and per-stage peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from etbench.scoring.stages import StageCache, _rss_mb
from support.stage_reads import stage_reads


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


def test_a_fresh_result_has_the_key_order_a_resumed_run_reads_back(tmp_path):
    """Rows built by iterating a stage's dicts (the items file's discovery scores, per group) came out in the
    compute's order on a fresh run and in the stored file's sorted order on a resumed one: same rows, other
    bytes. The fresh result is now exactly the stored one, key order included."""
    value = {"value_fetcher": {"b": 1, "a": 2}, "position_detector": [{"z": 1, "y": 2}]}
    fresh = StageCache(tmp_path).run("s", {}, lambda: value)
    resumed = StageCache(tmp_path).run("s", {}, lambda: pytest.fail("stored: not recomputed"))
    assert fresh == resumed == value
    assert json.dumps(fresh) == json.dumps(resumed)  # key order too, at every depth


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


def test_schedule_computes_own_stages_now_and_reads_others_on_first_use(tmp_path):
    from etbench.scoring.stages import COMPUTE, HAND_OFF, WAIT, StagesHandedOff

    plan = {"mine": COMPUTE, "theirs": WAIT, "end": HAND_OFF}.get
    worker = StageCache(tmp_path, plan=plan, poll_s=0.01, wait_s=5)
    read: list[str] = []
    mine = worker.schedule("mine", lambda: read.append("mine") or {}, lambda: 1)
    assert read == ["mine"] and worker.ran == ["mine"]  # computed when the pipeline reached it
    theirs = worker.schedule("theirs", lambda: read.append("theirs") or {"k": 1}, lambda: pytest.fail("not mine"))
    assert read == ["mine"]  # not even its key is built before it is used
    StageCache(tmp_path).run("theirs", {"k": 1}, lambda: 2)  # the other worker stores it
    assert (mine.value, theirs.value, theirs.value) == (1, 2, 2) and read == ["mine", "theirs"]
    with pytest.raises(StagesHandedOff) as handed:
        worker.schedule("end", lambda: pytest.fail("not read"), lambda: pytest.fail("not run"))
    assert handed.value.stage == "end" and set(handed.value.timings) == {"mine"}


def test_a_part_of_a_stage_is_computed_whatever_the_plan_says_of_its_name(tmp_path):
    """A stage's parts (faithfulness's ceilings and per-circuit evaluations) are stored under their own
    names, which no plan lists: the worker computing the stage computes them, never waits for them."""
    from etbench.core.errors import EtbenchError
    from etbench.scoring.stages import WAIT

    worker = StageCache(tmp_path, plan=lambda name: WAIT, poll_s=0.01, wait_s=0.05)
    assert worker.run("stage_part", {"k": 1}, lambda: 3, follow_plan=False) == 3 and worker.ran == ["stage_part"]
    assert StageCache(tmp_path).run("stage_part", {"k": 1}, lambda: pytest.fail("stored")) == 3
    with pytest.raises(EtbenchError, match="did not store"):  # the plan still governs a stage itself
        worker.run("other", {"k": 1}, lambda: pytest.fail("not mine"))


def test_a_source_directory_serves_stages_stored_under_the_same_key_only(tmp_path):
    from etbench.core.errors import EtbenchError
    from etbench.scoring.pipeline import stage_sources

    earlier = StageCache(tmp_path / "earlier" / "stages")
    earlier.run("shared", {"model": "base"}, lambda: {"value": 1.5})
    earlier.run("other_inputs", {"model": "base", "n": 10}, lambda: 2)
    earlier.run("edited", {"k": 1}, lambda: 3)
    edited = earlier.path("edited")
    edited.write_text(edited.read_text().replace('"result": 3', '"result": 4'))
    sources = stage_sources([tmp_path / "earlier"])  # a run directory stands for its stages/
    assert sources == [tmp_path / "earlier" / "stages"]

    cache = StageCache(tmp_path / "now" / "stages", sources=sources)
    assert cache.run("shared", {"model": "base"}, lambda: pytest.fail("reused")) == {"value": 1.5}
    assert cache.path("shared").read_bytes() == earlier.path("shared").read_bytes()  # copied: the run is whole
    assert cache.run("other_inputs", {"model": "base", "n": 20}, lambda: 5) == 5  # another key: computed
    assert cache.run("edited", {"k": 1}, lambda: 6) == 6  # a record failing its checksum is never served
    assert cache.reused == ["shared"] and cache.ran == ["other_inputs", "edited"]
    with pytest.raises(EtbenchError, match="--reuse-stages: .* is not a directory"):
        stage_sources([tmp_path / "missing"])


def test_a_source_serves_a_stage_only_when_it_was_made_under_the_same_device_and_libraries(tmp_path):
    """The key holds a stage's inputs, not the device or library versions its numbers came from (a run
    resumes its own directory whatever they are); a stage from another run made under others would put
    numbers of another device into a scorecard whose provenance names this one, so it is computed."""
    gpu = {"device": "cuda", "libraries": {"torch": "2.13.0"}}
    cpu = {"device": "cpu", "libraries": {"torch": "2.13.0"}}
    StageCache(tmp_path / "earlier", made_with=gpu).run("shared", {"model": "base"}, lambda: 1.5)
    assert StageCache(tmp_path / "earlier", made_with=cpu).run("shared", {"model": "base"},
                                                             lambda: pytest.fail("own: resumed")) == 1.5
    elsewhere = StageCache(tmp_path / "now_cpu", sources=[tmp_path / "earlier"], made_with=cpu)
    assert elsewhere.run("shared", {"model": "base"}, lambda: 2.5) == 2.5 and elsewhere.reused == []
    alike = StageCache(tmp_path / "now_gpu", sources=[tmp_path / "earlier"], made_with=gpu)
    assert alike.run("shared", {"model": "base"}, lambda: pytest.fail("reused")) == 1.5 and alike.reused == ["shared"]


def test_score_many_sides_compute_their_own_stages_before_waiting_on_the_other():
    """Each side computes its own stages as early as their inputs allow and waits for a stage of the
    other side only right before the first stage that reads it. The base side used to wait for
    faithfulness_ft (and the ft side for the base's three DCM seeds) before starting its own DCM."""
    from functools import partial

    from etbench.scoring.distributed import side_plan, stage_side
    from etbench.scoring.stages import COMPUTE, WAIT

    seeds = [f"dcm_{{}}_seed{s}" for s in (0, 1, 2)]  # the standard preset's DCM seeds

    def own(side, *names):
        return [(name.format(side), COMPUTE) for name in names]

    base, handed_at = stage_reads(partial(side_plan, "base"))
    assert base == [*own("base", "accuracy_{}", "circuit_{}", *seeds),
                    ("circuit_ft", WAIT), *own("base", "faithfulness_{}", "semantics_{}", "edges_{}")]
    assert handed_at == "cmap"  # the ft side's pair check, stages, semantics and CMAP are never read

    ft, handed_at = stage_reads(partial(side_plan, "ft"))
    assert handed_at is None
    assert ft == [("models", COMPUTE), *own("ft", "accuracy_{}", "circuit_{}", *seeds),
                  ("circuit_base", WAIT), ("faithfulness_ft", COMPUTE),
                  ("dcm_base_seed0", WAIT), ("semantics_ft", COMPUTE), ("edges_ft", COMPUTE), ("cmap", COMPUTE),
                  # then the scorecard reads the base side's remaining results
                  ("accuracy_base", WAIT), ("faithfulness_base", WAIT), ("dcm_base_seed1", WAIT),
                  ("dcm_base_seed2", WAIT), ("semantics_base", WAIT), ("edges_base", WAIT)]
    # every stage is computed by one side: the side stage_side names
    computed = [(name, side) for side, reqs in (("base", base), ("ft", ft)) for name, how in reqs if how == COMPUTE]
    assert len(computed) == len({name for name, _ in computed}) == 18
    assert all(stage_side(name) == side for name, side in computed)


def test_the_faithfulness_parts_belong_to_the_side_that_runs_their_stage():
    """The parts are stored under their own names but computed inside faithfulness_{side}; naming them the
    other side's made score-many's per-side record of computed stages disagree with stage_side (CI, stop 22)."""
    from etbench.scoring.distributed import stage_side

    for side in ("base", "ft"):
        for part in ("ceilings", "of_base", "of_ft"):
            assert stage_side(f"faithfulness_{side}_{part}") == side
    assert stage_side("faithfulness_ft") == "ft" and stage_side("faithfulness_base") == "base"


def test_a_single_process_score_computes_every_stage_once_in_pipeline_order():
    from etbench.scoring.stages import COMPUTE

    requests, handed_at = stage_reads(None)
    names = ["models", "accuracy_base", "accuracy_ft", "circuit_base", "circuit_ft",
             *[f"dcm_{w}_seed{s}" for w in ("base", "ft") for s in (0, 1, 2)],
             "faithfulness_base", "faithfulness_ft", "semantics_base", "semantics_ft", "edges_base", "edges_ft", "cmap"]
    assert handed_at is None and requests == [(name, COMPUTE) for name in names]


def test_a_failed_side_reports_the_workers_own_message_not_rays_wrapper():
    """Ray wraps a worker's exception; its first line named only the task ('ray::run_side() (pid=...)'), so a
    missing model package reached the user as that line and nothing else."""
    from etbench.core.errors import EtbenchError
    from etbench.scoring.distributed import _worker_error

    class Wrapped(Exception):  # the shape of ray.exceptions.RayTaskError: the original under .cause
        def __init__(self, cause):
            super().__init__("ray::run_side() (pid=1, ip=0.0.0.0)")
            self.cause = cause

    assert _worker_error(Wrapped(EtbenchError("gemma-base needs: pip install x"))) == "gemma-base needs: pip install x"
    assert _worker_error(Wrapped(ValueError("bad shape\nmore"))) == "ValueError: bad shape"
    assert _worker_error(RuntimeError("plain")) == "RuntimeError: plain"
    # a wrapper of a wrapper (Ray's RayTaskError is itself an EtbenchError subclass when the cause is one)
    class WrappedEtbench(EtbenchError):
        def __init__(self, cause):
            super().__init__("\x1b[36mray::run_side()\x1b[39m (pid=1)\nTraceback ...")
            self.cause = cause

    assert _worker_error(Wrapped(WrappedEtbench(EtbenchError("deep")))) == "deep"
    assert _worker_error(Wrapped(EtbenchError("line one\nline two"))) == "line one"
