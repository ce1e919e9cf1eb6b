"""etbench score-many on Ray (issue #15): two pairs of toy models scored on a local Ray with two
worker slots give the same scorecard bytes as sequential `etbench score` runs, and after a worker is
killed mid-run, running again recomputes only the stages that were not stored."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from etbench.api import score, score_many  # noqa: E402
from etbench.core.errors import EtbenchError  # noqa: E402
from etbench.core.io import atomic_write_json  # noqa: E402
from etbench.models import toy  # noqa: E402
from etbench.schema.circuit import Circuit, Node  # noqa: E402
from etbench.scoring.distributed import PairJob, stage_side, start_local  # noqa: E402
from etbench.scoring.presets import Preset  # noqa: E402

pytestmark = pytest.mark.slow

MICRO = Preset("micro", accuracy_n=8, accuracy_boxes=(3,), discovery_mode="fast", discovery_n=8,
                       minimality_n=8, faithfulness_n=8, mean_n=8, random_draws=1, completeness_draws=1, dcm="quick",
                       dcm_seeds=(0,), cmap_n=8, cmap_variants=("output",),
                       dcm_groups=("value_fetcher",))
OUTPUTS = ("scorecard.json", "items.jsonl", "circuit_base.json", "circuit_ft.json", "report.md")


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    tokenizer = toy.word_level_tokenizer()
    for seed, name in enumerate(("base", "ft1", "ft2")):
        model = toy.tiny_llama(len(tokenizer), seed=seed, n_layers=2, n_heads=4)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    # A and D heads only: DCM then trains A's masks alone (D needs none), the cheapest full pipeline
    nodes = {"value_fetcher": [Node("value_fetcher", 1, 0), Node("value_fetcher", 1, 2)], "position_transmitter": [],
             "position_detector": [], "structure_reader": [Node("structure_reader", 0, 0)]}
    atomic_write_json(root / "circuit.json", Circuit(nodes, model="toy", n_layers=2, n_heads=4).to_dict())
    return root


def _jobs(toys, out):
    circuit = str(toys / "circuit.json")
    return [PairJob(str(toys / "base"), str(toys / ft), str(out / ft), circuit, circuit) for ft in ("ft1", "ft2")]


def test_two_pairs_on_ray_equal_sequential_and_resume_after_a_killed_worker(toys, tmp_path):
    t0 = time.perf_counter()
    for job in _jobs(toys, tmp_path / "seq"):
        score(job.base, job.ft, job.out_dir, preset=MICRO, circuit_base=job.circuit_base,
                      circuit_ft=job.circuit_ft, progress=False)
    sequential_s = time.perf_counter() - t0

    start_local(ray, 2)  # a local Ray with 2 worker slots
    try:
        t0 = time.perf_counter()
        results = score_many(_jobs(toys, tmp_path / "ray"), preset=MICRO)
        ray_s = time.perf_counter() - t0
        for r, ft in zip(results, ("ft1", "ft2")):
            for name in OUTPUTS:
                assert (tmp_path / "ray" / ft / name).read_bytes() == (tmp_path / "seq" / ft / name).read_bytes(), name
            # both sides worked, each on its own stages, every stage once
            assert r.computed["base"] and r.computed["ft"]
            assert {stage_side(s) for s in r.computed["base"]} == {"base"}
            assert {stage_side(s) for s in r.computed["ft"]} == {"ft"}
        print(f"\n2 pairs: sequential {sequential_s:.1f} s, Ray (2 worker slots) {ray_s:.1f} s")

        # a worker killed mid-run: the run fails with one line; running again resumes from the cache
        jobs = _jobs(toys, tmp_path / "killed")
        failure: list[BaseException] = []

        def first_run():
            try:
                score_many(jobs, preset=MICRO, retries=0)
            except BaseException as err:  # noqa: BLE001 - inspected below
                failure.append(err)

        thread = threading.Thread(target=first_run)
        thread.start()
        stages = os.path.join(jobs[0].out_dir, "stages")
        marker = os.path.join(stages, "worker_base.json")
        deadline = time.monotonic() + 600
        while not (os.path.exists(os.path.join(stages, "accuracy_base.json")) and os.path.exists(marker)):
            assert time.monotonic() < deadline and thread.is_alive(), "the base side never stored a stage"
            time.sleep(0.2)
        os.kill(json.loads(open(marker).read())["pid"], signal.SIGKILL)
        thread.join(600)
        assert failure and isinstance(failure[0], EtbenchError) and "run the same command again" in str(failure[0])
        stored = {f[:-5] for f in os.listdir(stages) if f.endswith(".json") and not f.startswith("worker_")}
        assert "accuracy_base" in stored and not os.path.exists(os.path.join(jobs[0].out_dir, "scorecard.json"))

        again = score_many(jobs, preset=MICRO)
        recomputed = set(again[0].computed["base"]) | set(again[0].computed["ft"])
        assert recomputed and not recomputed & stored
        for name in OUTPUTS:
            assert (tmp_path / "killed" / "ft1" / name).read_bytes() == (tmp_path / "seq" / "ft1" / name).read_bytes()
    finally:
        ray.shutdown()


def test_plan_file_and_bad_input(tmp_path):
    from etbench.scoring.distributed import jobs_for, load_plan

    plan = tmp_path / "plan.yaml"
    plan.write_text("preset: quick\nseed: 1\npairs:\n  - {base: tiny-base, ft: tiny-ft, out: out/a}\n")
    jobs, settings = load_plan(plan)
    assert settings == {"preset": "quick", "seed": 1}
    assert jobs == [PairJob("tiny-base", "tiny-ft", str(tmp_path / "out" / "a"))]
    plan.write_text("pairs:\n  - {base: tiny-base}\n")
    with pytest.raises(EtbenchError, match="pair 0 needs base, ft and out"):
        load_plan(plan)
    plan.write_text("preset: quick\nworkers: 3\npairs: [{base: a, ft: b, out: c}]\n")
    with pytest.raises(EtbenchError, match="unknown keys workers"):
        load_plan(plan)
    assert [j.out_dir for j in jobs_for("b", ["org/ft-a", "org/ft-b"], tmp_path)] == [
        str(tmp_path / "ft-a"), str(tmp_path / "ft-b")]
    with pytest.raises(EtbenchError, match="share an output directory"):
        score_many([PairJob("a", "b", str(tmp_path / "x")), PairJob("a", "c", str(tmp_path / "x"))])
    with pytest.raises(EtbenchError, match="unknown preset"):
        score_many([PairJob("a", "b", str(tmp_path / "x"))], preset="huge")


@pytest.mark.parametrize("line, fragment", [
    ("preset: [1]", "preset must be a non-empty string, got [1]"),
    ("preset: {a: 1}", "preset must be a non-empty string, got {'a': 1}"),
    ("seed: x", "seed must be an integer, got 'x'"),
    ("seed: true", "seed must be an integer, got True"),
    ("seed: -1", "seed must be between 0 and"),
    ("dtype: [1]", "dtype must be a non-empty string or null, got [1]"),
    ("device: 5", "device must be a non-empty string, got 5"),
    ("discovery: {}", "discovery must be a non-empty string or null"),
    ("pairs: [{base: a, ft: b, out: 5}]", "pair 0's out must be a non-empty string, got 5"),
    ("pairs: [{base: a, ft: b, out: [1]}]", "pair 0's out must be a non-empty string, got [1]"),
    ("pairs: [{base: [1], ft: b, out: o}]", "pair 0's base must be a non-empty string, got [1]"),
    ("pairs: [{base: a, ft: b, out: o, circuit_base: 5}]", "pair 0's circuit_base must be a non-empty string or "
     "null, got 5"),
])
def test_plan_values_of_the_wrong_type_are_refused_naming_the_file_and_key(tmp_path, line, fragment):
    """A plan value of the wrong type (``preset: [1]``, ``out: 5``) crashed with a TypeError traceback, or (a
    circuit) failed inside a Ray worker."""
    from etbench.scoring.distributed import load_plan

    plan = tmp_path / "plan.yaml"
    pairs = "" if line.startswith("pairs:") else "pairs: [{base: a, ft: b, out: o}]\n"
    plan.write_text(f"{line}\n{pairs}")
    with pytest.raises(EtbenchError) as err:
        load_plan(plan)
    assert str(err.value).startswith(f"plan {plan}: ") and fragment in str(err.value)


def test_check_resources_refuses_fewer_cpus_than_one_pairs_placement_group():
    """``--num-cpus 1`` hung: a pair's placement group (one bundle of --cpus-per-side CPUs per side) never fit."""
    from etbench.scoring.distributed import check_resources

    for num_cpus, cpus in ((1, 1), (3, 2), (1, 0.75)):
        with pytest.raises(EtbenchError, match=f"--num-cpus {num_cpus} cannot hold one pair"):
            check_resources(num_cpus, cpus, None, 0)
    for num_cpus, cpus in ((2, 1), (1, 0.5), (4, 2), (None, 8)):
        check_resources(num_cpus, cpus, None, 0)


def test_a_missing_circuit_is_refused_before_ray_starts_and_nothing_is_written(tmp_path):
    """A plan's missing circuit file failed inside a worker: ``.etbench-score-manifest.json``, ``workers.json``
    and ``stages/`` were left in the pair's directory, and the error said to run again to resume."""
    out = tmp_path / "pair"
    for side in ("circuit_base", "circuit_ft"):
        job = PairJob("tiny-base", "tiny-ft", str(out), **{side: str(tmp_path / "missing.json")})
        with pytest.raises(EtbenchError) as err:
            score_many([job], num_cpus=2)
        assert f"{side}: circuit file not found: {tmp_path / 'missing.json'}" in str(err.value)
        assert "again" not in str(err.value) and not ray.is_initialized()
        assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    ([], "give --plan, or --base and at least one --ft"),
    (["--plan", "p.yaml", "--base", "a"], "either --plan or --base/--ft"),
    (["--plan", "missing.yaml"], "cannot read plan"),
    (["--base", "a", "--ft", "b", "--preset", "huge"], "unknown preset"),
    (["--base", "a", "--ft", "b", "--num-cpus", "1"], "--num-cpus 1 cannot hold one pair"),
    (["--base", "a", "--ft", "b", "--num-cpus", "3", "--cpus-per-side", "2"], "--num-cpus 3 cannot hold one pair"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, fragment):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "etbench.cli", "score-many", *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("etbench: error:") and fragment in lines[-1]
