"""Many pairs at once: ``etbench score-many`` schedules every pair's stages as Ray tasks.

Each pair runs as two Ray tasks that share the pair's stage cache (``etbench.scoring.stages``): the *base side*
computes the base model's accuracy, circuit, DCM, faithfulness and the semantics check on the base model;
the *ft side* checks the pair (``models``), then the fine-tuned model's stages (its semantics check
included) and CMAP, and writes the scorecard. A side computes its own stages as soon as the pipeline
reaches them and reads a result of the other side only when it first uses it, waiting for it on disk
then (``StageCache.schedule``, ``WAIT``): the base side waits only for the ft circuit (its faithfulness
stage evaluates both circuits), the ft side for the base circuit, the base DCM heads (semantics) and, to
write the scorecard, the rest of the base side's results. So the two run concurrently and every stage is
computed once, by one worker. The scorecard is assembled from exactly the stored results a sequential
``etbench score`` would read back, so its bytes are the same (tests/integration/test_distributed.py; the
report is written by ``etbench.score_many``).

The stage cache is the unit of resumption: when a worker dies, ``score-many`` fails with one line;
running it again recomputes only the stages that were not stored (with ``retries`` > 0 Ray reruns a
killed task by itself, which resumes the same way).

Both sides of a pair are placed together (a Ray placement group of two bundles), so a side never waits
on a sibling that cannot be scheduled. Resources per side: ``cpus`` CPUs and ``gpus`` GPUs (default: 1
per side on CUDA, else 0); the ft side holds both models for the pair check and CMAP.

Ray: ``address=None`` starts a local Ray on demand (this machine's CPUs and GPUs) and stops it after;
``"auto"`` or ``"HOST:PORT"`` attaches to a running cluster, whose nodes must have etbench installed
and must all see the output directories (a shared file system).
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from etbench.core.checks import check_range, check_seed
from etbench.core.errors import EtbenchError, one_line
from etbench.core.io import atomic_write_json, claim_outputs
from etbench.models import availability, check_device_name, default_dtype, resolve
from etbench.schema.circuit import DISCOVERY_MODES
from etbench.scoring import graph, pipeline
from etbench.scoring.presets import SCORE_PRESETS, Preset
from etbench.scoring.stages import COMPUTE, HAND_OFF, WAIT, StagesHandedOff

SIDES = graph.SIDES
#: What score-many writes into a pair's directory beside ``score``'s files (claimed in the same manifest).
WORKERS_FILE = "workers.json"
SCORE_MANY_OUTPUTS = (WORKERS_FILE,)


@dataclass(frozen=True)
class PairJob:
    """One pair to score into ``out_dir``."""

    base: str
    ft: str
    out_dir: str
    circuit_base: str | None = None
    circuit_ft: str | None = None


@dataclass
class PairResult:
    job: PairJob
    scorecard: str | None  # path, when the pair finished
    computed: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> stage -> seconds
    error: str | None = None


def stage_side(name: str) -> str:
    """Which side computes stage ``name``: the graph's (``graph.worker_of``: a per-side stage its own side's,
    its parts included; the pair check and CMAP the ft side's, which holds both models). The base model's
    semantics check is the base side's: it needs only the base model and the base DCM heads, and the ft side
    is the longer one (estimated from the standard tiny pair's stage times, not measured end to end: 91
    instead of 96 min for the pair on 2 workers)."""
    return graph.worker_of(name)


def side_plan(side: str, name: str) -> str:
    """``StageCache`` plan of one side. The base side's share ends at the graph's last stage (CMAP), the first
    stage in ``score``'s order after its last own stage (everything from there on is the ft side's)."""
    if stage_side(name) == side:
        return COMPUTE
    if side == "base" and name == graph.GRAPH[-1].name:
        return HAND_OFF
    return WAIT


def _worker_error(err: BaseException) -> str:
    """One line for a side's failure. Ray wraps the worker's exception (``RayTaskError``, whose own first
    line names only the task); an ``EtbenchError`` inside is the message meant for the user, as is."""
    # a task that failed on another task's failure wraps a wrapper: unwrap down to the worker's own exception
    while isinstance(getattr(err, "cause", None), BaseException) and err.cause is not err:
        err = err.cause
    if isinstance(err, EtbenchError) and str(err).strip():
        return str(err).strip().splitlines()[0]
    return one_line(err)


#: The keys of a plan file beside ``pairs``, and of each pair: the types their values must have.
PLAN_SETTINGS: dict[str, tuple[type, ...]] = {"preset": (str,), "seed": (int,), "dtype": (str, type(None)),
                                              "device": (str,), "discovery": (str, type(None))}
PAIR_KEYS: dict[str, tuple[type, ...]] = {"base": (str,), "ft": (str,), "out": (str,),
                                          "circuit_base": (str, type(None)), "circuit_ft": (str, type(None))}
_TYPE_NAMES = {str: "a non-empty string", int: "an integer", type(None): "null"}


def _check_plan_value(path: Path, key: str, value: Any, types: tuple[type, ...]) -> None:
    """One line naming the plan file and ``key`` when ``value`` is not of ``types`` (YAML reads ``5`` as a number
    and ``[1]`` as a list: they crashed later as TypeErrors)."""
    ok = isinstance(value, types) and not isinstance(value, bool) and value != ""
    if not ok:
        raise EtbenchError(f"plan {path}: {key} must be {' or '.join(_TYPE_NAMES[t] for t in types)}, got {value!r}")


def load_plan(path: str | Path) -> tuple[list[PairJob], dict[str, Any]]:
    """A plan file (YAML or JSON): ``pairs: [{base, ft, out, circuit_base?, circuit_ft?}]`` plus any of
    ``preset``, ``seed``, ``dtype``, ``device``, ``discovery``. Returns (pairs, settings)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise EtbenchError(f"cannot read plan {path}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("pairs"), list) or not doc["pairs"]:
        raise EtbenchError(f"plan {path}: expected a mapping with a non-empty 'pairs' list")
    known = {"pairs", *PLAN_SETTINGS}
    unknown = set(doc) - known
    if unknown:
        raise EtbenchError(f"plan {path}: unknown keys {', '.join(sorted(map(str, unknown)))} "
                           f"(known: {', '.join(sorted(known))})")
    settings = {k: doc[k] for k in PLAN_SETTINGS if k in doc}
    for key, value in settings.items():
        _check_plan_value(path, key, value, PLAN_SETTINGS[key])
    if "seed" in settings:
        check_seed(settings["seed"], f"plan {path}: seed")
    jobs = []
    for i, row in enumerate(doc["pairs"]):
        if not isinstance(row, dict) or not {"base", "ft", "out"} <= set(row) or set(row) - set(PAIR_KEYS):
            raise EtbenchError(f"plan {path}: pair {i} needs base, ft and out (and optionally circuit_base, circuit_ft)")
        for key, value in row.items():
            _check_plan_value(path, f"pair {i}'s {key}", value, PAIR_KEYS[key])
        out = Path(row["out"])
        out = out if out.is_absolute() else path.parent / out
        jobs.append(PairJob(row["base"], row["ft"], str(out), row.get("circuit_base"), row.get("circuit_ft")))
    return jobs, settings


def jobs_for(base: str, fts: Sequence[str], out_root: str | Path) -> list[PairJob]:
    """One base and several fine-tunes: ``out_root/<ft name>`` per pair."""
    names = [Path(ft.rstrip("/")).name.replace(":", "_") or "ft" for ft in fts]
    if len(set(names)) != len(names):
        names = [f"{i:02d}-{n}" for i, n in enumerate(names)]
    return [PairJob(base, ft, str(Path(out_root) / n)) for ft, n in zip(fts, names)]


def run_side(job: PairJob, side: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One side of one pair (the body of a Ray task; also callable directly)."""

    marker = Path(job.out_dir) / "stages" / f"worker_{side}.json"
    atomic_write_json(marker, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    try:
        run = pipeline.score(job.base, job.ft, job.out_dir, circuit_base=job.circuit_base, circuit_ft=job.circuit_ft,
                    stage_plan=partial(side_plan, side), progress=False, **settings)
        return {"side": side, "computed": dict(run.timings), "scorecard": str(run.path)}
    except StagesHandedOff as handed:
        return {"side": side, "computed": handed.timings, "scorecard": None}
    finally:
        marker.unlink(missing_ok=True)


def _ray():
    try:
        import ray
    except ImportError:
        raise EtbenchError("score-many needs Ray: pip install 'etbench[ray]'") from None
    return ray


#: ``--ray-address``: ``auto`` (a cluster Ray finds on this node), or ``[ray://]HOST:PORT``.
RAY_ADDRESS = re.compile(r"(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")
#: Bounds on Ray's counts: CPU/GPU slots (local or per side) and reruns of a dead side.
MAX_SLOTS = 4096
MAX_RETRIES = 100
#: How long ``check_address`` waits for the head node to accept a connection (Ray's own attempt logs for minutes).
REACH_TIMEOUT_S = 5.0


def check_address(address: str | None, timeout: float = REACH_TIMEOUT_S) -> None:
    """``address`` is ``None`` (a local Ray), ``auto``, or ``[ray://]HOST:PORT`` where something accepts a TCP
    connection within ``timeout`` seconds: one line naming the address otherwise."""
    if address is None or address == "auto":
        return
    match = RAY_ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise EtbenchError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    why = _grpc_answer(match["host"].strip("[]"), int(match["port"]), timeout)
    if why:
        raise EtbenchError(f"--ray-address {address}: no Ray head answers there ({why}; waited up to {timeout:g} s): "
                           "start it with `ray start --head` or give the address it printed")


#: HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, or its client server) answers
#: with a SETTINGS frame of its own.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _grpc_answer(host: str, port: int, timeout: float) -> str:
    """"" when a gRPC server answers at ``host:port`` within ``timeout``, else why not. A TCP connection alone
    proves nothing: a proxy or an unrelated service accepts it, and Ray then retried for minutes."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(_HTTP2_HELLO)
            frame = conn.recv(9)
    except TimeoutError:
        return "timed out"
    except OSError as err:
        return err.strerror or str(err)
    if len(frame) < 4 or frame[3] != 4:  # byte 3 of a frame header is its type; 4 = SETTINGS
        return "something accepted the connection but does not speak gRPC"
    return ""


def pair_bundles(cpus: float, gpus: float) -> list[dict[str, float]]:
    """The placement group of one pair: a bundle per side, each of ``cpus`` CPUs and ``gpus`` GPUs."""
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return [bundle for _ in SIDES]


def check_resources(num_cpus: int | None, cpus: float, gpus: float | None, retries: int) -> None:
    """The Ray resources asked for are counts Ray accepts: slots >= 1, a side's CPUs > 0 and GPUs >= 0, retries
    >= 0 (Ray's own refusals were tracebacks), and ``num_cpus`` slots hold one pair's placement group (Ray
    waited for it forever)."""
    if num_cpus is not None:
        check_range(num_cpus, "--num-cpus", 1, MAX_SLOTS)
    check_range(retries, "--retries", 0, MAX_RETRIES)
    for option, value, low_ok in (("--cpus-per-side", cpus, False), ("--gpus-per-side", gpus, True)):
        if value is None and option == "--gpus-per-side":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not (value >= 0 if low_ok else value > 0) or value > MAX_SLOTS:
            bound = ">= 0" if low_ok else "> 0"
            raise EtbenchError(f"{option} must be a number {bound} and at most {MAX_SLOTS}, got {value!r}")
    pair_cpus = sum(bundle["CPU"] for bundle in pair_bundles(cpus, 0))
    if num_cpus is not None and num_cpus < pair_cpus:
        raise EtbenchError(f"--num-cpus {num_cpus} cannot hold one pair: its {len(SIDES)} sides run at once, "
                           f"{cpus:g} CPUs each (--cpus-per-side), {pair_cpus:g} in all: give --num-cpus >= "
                           f"{math.ceil(pair_cpus)} or a smaller --cpus-per-side")



def _check(jobs: Sequence[PairJob], settings: dict[str, Any]) -> None:
    """Fail before starting Ray on what every worker would fail on."""
    if not jobs:
        raise EtbenchError("score-many needs at least one pair")
    outs = [str(Path(j.out_dir).resolve()) for j in jobs]
    if len(set(outs)) != len(outs):
        raise EtbenchError("two pairs share an output directory")
    if not isinstance(settings["preset"], Preset) and (not isinstance(settings["preset"], str)
                                                       or settings["preset"] not in SCORE_PRESETS):
        raise EtbenchError(f"unknown preset {settings['preset']!r}; known: {', '.join(SCORE_PRESETS)}")
    if settings["discovery"] not in (None, *DISCOVERY_MODES):
        raise EtbenchError(f"discovery must be one of {', '.join(DISCOVERY_MODES)}, got {settings['discovery']!r}")
    # every pair's inputs, as ``score`` checks them, before Ray starts (a missing model package used to
    # surface only from inside a worker); the device is each worker's to check (this process may be a
    # CPU-only driver of a GPU cluster), so the check runs as for the CPU
    check_device_name(settings["device"])
    for job in jobs:
        pipeline.check_inputs(job.base, job.ft, job.out_dir, seed=settings["seed"],
                              dtype=settings["dtype"] or default_dtype("cpu"), device="cpu",
                              extra_outputs=SCORE_MANY_OUTPUTS)
        # a bad circuit failed only in a worker, after the workers had written into the pair's directory
        for flag, given in (("circuit_base", job.circuit_base), ("circuit_ft", job.circuit_ft)):
            try:
                pipeline.circuit_spec(given)
            except EtbenchError as err:
                raise EtbenchError(f"pair {job.base} -> {job.ft}: {flag}: {err}") from None
        # a model that cannot be loaded (not on this machine, or a hub id neither cached nor reachable) failed
        # inside the workers, 30-50 s after Ray started; the driver sees what the workers see (a shared file system)
        for flag, ref in (("base", job.base), ("ft", job.ft)):
            found = availability(resolve(ref), allow_download=True)
            if not found.ok:
                raise EtbenchError(f"pair {job.base} -> {job.ft}: {flag} {ref} cannot be loaded: {found.why}")


def score_many(jobs: Sequence[PairJob], *, preset: Any = "quick", seed: int = 0, dtype: str | None = None,
               device: str = "cpu", discovery: str | None = None, address: str | None = None,
               num_cpus: int | None = None, cpus: float = 1, gpus: float | None = None, retries: int = 0,
               echo=None) -> list[PairResult]:
    """Score every pair through Ray (see the module docstring); one ``PairResult`` per job, in order.
    Raises ``EtbenchError`` naming the failed pairs when any failed (the others are complete)."""
    settings = {"preset": preset, "seed": seed, "dtype": dtype, "device": device, "discovery": discovery}
    check_resources(num_cpus, cpus, gpus, retries)
    _check(jobs, settings)
    check_address(address)
    ray = _ray()
    gpus = (1.0 if device.startswith("cuda") else 0.0) if gpus is None else gpus
    started = False
    if not ray.is_initialized():
        if address is None:
            start_local(ray, num_cpus)
            started = True
        else:
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as err:
                raise EtbenchError(f"cannot attach to the Ray cluster at {address}: {err}") from None
            started = True
    try:
        return _schedule(ray, jobs, settings, cpus, gpus, retries, echo)
    finally:
        if started:
            ray.shutdown()


def start_local(ray, num_cpus: int | None, attempts: int = 2) -> None:
    """A local Ray for this run. Ray waits a fixed 30 s for its raylet to register; on a loaded machine
    that can run out (measured here on a shared 2-core box), so the start is tried twice."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this timeout
            ray.shutdown()
            if attempt == attempts - 1 or "timed out during startup" not in str(err):
                raise EtbenchError(f"could not start a local Ray: {one_line(err)}") from None


def _schedule(ray, jobs, settings, cpus, gpus, retries, echo) -> list[PairResult]:
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(run_side)
    pending: dict[Any, tuple[int, str]] = {}
    groups = []
    for i, job in enumerate(jobs):
        # both sides of a pair are placed at once: a side waiting on its sibling never holds a slot
        # the sibling needs
        pg = placement_group(pair_bundles(cpus, gpus), strategy="PACK")
        groups.append(pg)
        for j, side in enumerate(SIDES):
            ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=j),
                               ).remote(job, side, settings)
            pending[ref] = (i, side)
    results = [PairResult(job, None) for job in jobs]

    def release(i: int) -> None:
        # why as soon as a pair ends: its placement group holds its slots until removed, and later
        # pairs wait for them
        if not any(k == i for k, _ in pending.values()):
            remove_placement_group(groups[i])

    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i, side = pending.pop(done[0])
            try:
                out = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - a worker's failure of any kind fails its pair
                results[i].error = f"{side} side: {_worker_error(err)}"
                for ref, (k, other) in list(pending.items()):
                    if k == i:  # the sibling may be waiting for this side's stages forever
                        ray.cancel(ref, force=True)
                        pending.pop(ref)
                release(i)
                continue
            release(i)
            results[i].computed[side] = out["computed"]
            if out["scorecard"]:
                results[i].scorecard = out["scorecard"]
            if echo is not None:
                echo(f"{jobs[i].ft}: {side} side done ({len(out['computed'])} stages computed)")
    finally:
        for i in {k for k, _ in pending.values()}:
            remove_placement_group(groups[i])
    for r in results:
        if r.error is None and r.scorecard is None:
            r.error = "no scorecard was written"
        claim_outputs(Path(r.job.out_dir), SCORE_MANY_OUTPUTS, pipeline.SCORE_WRITER)
        atomic_write_json(Path(r.job.out_dir) / WORKERS_FILE, {"computed_s": r.computed, "error": r.error})
    failed = [r for r in results if r.error]
    if failed:
        raise EtbenchError(f"{len(failed)} of {len(results)} pairs failed ("
                           + "; ".join(f"{r.job.ft}: {r.error}" for r in failed)
                           + "); run the same command again to resume from the stage cache")
    return results


def format_results(results: Sequence[PairResult]) -> str:
    lines = []
    for r in results:
        n = {side: len(stages) for side, stages in r.computed.items()}
        lines.append(f"{r.job.ft}: {r.scorecard} (stages computed: base {n.get('base', 0)}, ft {n.get('ft', 0)})")
    return "\n".join(lines)

