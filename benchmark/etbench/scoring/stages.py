"""Resumable stages: each stage's result is stored on disk under the hash of what it depends on (the
settings it uses and the results of the stages it reads), so an interrupted run restarts where it
stopped, a finished one is never redone, and changing one stage's settings recomputes only that
stage and the stages downstream of it.

A stage result is strict JSON (``{"key", "result", "checksum"}``), written atomically: a stage is either
complete on disk or absent, never half-written. A file that is unreadable, of the wrong shape, stored
under another key, or edited since it was written (its checksum no longer matches) is a miss: the
stage is computed again rather than trusted. Each computed stage's wall time, peak memory and token
positions run through the models (``mech.interventions.PassTally``) are kept beside it. Non-finite floats (a ratio over zero items) are stored
as ``{"$float": "nan"}`` so the file stays valid JSON and the value reads back unchanged. Wall times go to a separate file so that cached and
fresh runs produce byte-identical results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from etbench.core.errors import EtbenchError
from etbench.core.io import atomic_write_json, dumps_json, loads_json
from etbench.mech.interventions import tallying
from etbench.schema.scorecard import config_hash


def encode_floats(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``{"$float": "nan" | "inf" | "-inf"}``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": repr(obj)}
    if isinstance(obj, dict):
        return {str(k): encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_floats(v) for v in obj]
    return obj


def decode_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"$float"} and obj["$float"] in ("nan", "inf", "-inf"):
            return float(obj["$float"])
        return {k: decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_floats(v) for v in obj]
    return obj


def result_checksum(encoded: Any) -> str:
    """sha256 of a stored (encoded) result's canonical JSON: an edit of the result no longer matches it."""
    return hashlib.sha256(json.dumps(encoded, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def stage_key(name: str, depends: Any) -> str:
    """Hash of a stage's name and everything it depends on (canonical JSON)."""
    return config_hash({"stage": name, "depends": depends})


def _rss_mb() -> float | None:
    """This process's resident memory now (Linux ``/proc``), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak resident memory (MB) while the block runs, sampled every ``interval`` seconds by a thread;
    where ``/proc`` is missing, the process's lifetime peak (``ru_maxrss``) at the end."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while True:
            now = _rss_mb()
            if now is not None:
                self.peak_mb = max(self.peak_mb, now)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if _rss_mb() is None:  # no /proc: ru_maxrss is KiB on Linux, bytes on macOS
            scale = 2**20 if sys.platform == "darwin" else 2**10
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        self.peak_mb = round(self.peak_mb, 1)


#: What a worker does with a stage it finds neither on disk nor up to date (``StageCache(plan=...)``).
COMPUTE, WAIT, HAND_OFF = "compute", "wait", "hand_off"


class StagesHandedOff(Exception):
    """Raised by ``StageCache.run`` for a stage the plan hands to another worker: this worker is done.
    ``timings``: the stages it computed (seconds)."""

    def __init__(self, stage: str, timings: dict[str, float]) -> None:
        super().__init__(stage)
        self.stage, self.timings = stage, timings


class Deferred:
    """A value computed on first read of ``.value`` (then kept): a stage result that ``StageCache.schedule``
    fetches only when a later stage, or the scorecard, uses it."""

    def __init__(self, resolve: Callable[[], Any]) -> None:
        self._resolve: Callable[[], Any] | None = resolve
        self._value: Any = None

    @property
    def value(self) -> Any:
        if self._resolve is not None:
            self._value = self._resolve()
            self._resolve = None  # only after success: a failed read (a wait that timed out) raises again
        return self._value


def _stored(path: Path, key: str) -> dict[str, Any] | None:
    """The record at ``path`` when it holds a result under ``key`` that matches its checksum."""
    try:
        stored = loads_json(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):  # ValueError: not JSON, or NaN/Infinity in it
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or "result" not in stored:
        return None
    if stored.get("checksum") != result_checksum(stored["result"]):
        return None
    return stored


class StageCache:
    """Stage results on disk under ``directory``.

    ``plan(name)`` splits one run's stages between workers sharing the directory (``etbench
    score-many`` runs a pair's base-side and ft-side stages at once): ``COMPUTE`` (the default for
    every stage), ``WAIT`` for another worker to store it (polling every ``poll_s`` up to
    ``wait_s``), or ``HAND_OFF`` (raise ``StagesHandedOff``: the rest is another worker's).
    ``schedule`` applies the plan lazily: a worker computes its own stages in the pipeline's order and
    waits for another worker's stage only when it first uses that stage's result."""

    def __init__(self, directory: str | Path, plan: Callable[[str], str] | None = None, poll_s: float = 0.5,
                 wait_s: float = 7 * 24 * 3600, sources: Sequence[str | Path] = (),
                 made_with: Any = None) -> None:
        self.directory = Path(directory)
        # other runs' stage directories, read-only: a stage stored there under the same key (every input)
        # and made under the same ``made_with`` is the same result, so it is copied here instead of computed
        self.sources = [Path(d) for d in sources]
        # what made the results besides their inputs (the device, the library versions: the same inputs
        # give other numbers under others), stored with each stage but not keying it, so that a run
        # resumes under its own directory's stages as before; a source's stage is taken only when made
        # under the same (a record without it, from before, is not)
        self.made_with = made_with
        self.reused: list[str] = []  # stages copied from a source
        self.plan, self.poll_s, self.wait_s = plan, poll_s, wait_s
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}  # per computed stage
        self.passes: dict[str, dict[str, int]] = {}  # per computed stage: token positions (``PassTally``)
        self.ran: list[str] = []  # stages computed in this process (the others came from disk)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def load(self, name: str, key: str) -> Any | None:
        """The stored result of ``name`` under ``key``, from this directory or else a source (made under
        ``made_with``; then copied here, so the run's directory is complete); None (a miss) when the file
        is absent, unreadable, of the wrong shape, stored under another key, or edited since it was written."""
        stored = _stored(self.path(name), key)
        if stored is not None:
            return decode_floats(stored["result"])
        for source in self.sources:
            found = _stored(source / f"{name}.json", key)
            if found is not None and found.get("made_with") == self.made_with:
                self._store(name, found)
                self.reused.append(name)
                return decode_floats(found["result"])
        return None

    def _store(self, name: str, stored: dict[str, Any]) -> None:
        try:
            atomic_write_json(self.path(name), stored)
        except OSError as err:
            raise EtbenchError(f"{self.path(name)}: cannot store stage {name!r} ({err.strerror or err})") from None

    def run(self, name: str, depends: Any, compute: Callable[[], Any], follow_plan: bool = True) -> Any:
        """The stored result of stage ``name``, computing (and storing) it when absent or stale
        (stored under other ``depends``). ``follow_plan=False``: a part of a stage this worker is
        computing, which it computes whatever the plan says of the name."""
        key = stage_key(name, depends)
        cached = self.load(name, key)
        if cached is not None:
            return cached
        action = COMPUTE if self.plan is None or not follow_plan else self.plan(name)
        if action == HAND_OFF:
            raise StagesHandedOff(name, dict(self.timings))
        if action == WAIT:
            return self._wait(name, key)
        start = time.perf_counter()
        with PeakMemory() as memory, tallying() as tally:
            result = compute()
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.peak_rss_mb[name] = memory.peak_mb
        self.passes[name] = tally.as_dict()
        encoded = encode_floats(result)
        # Round-trip through the stage file's own writer and reader, so a fresh result is exactly what a resumed
        # run will read back, key order included (dumps_json sorts keys)
        result = decode_floats(loads_json(dumps_json(encoded)))
        record = {"key": key, "result": encoded, "checksum": result_checksum(encoded)}
        if self.made_with is not None:
            record["made_with"] = self.made_with
        self._store(name, record)
        self.ran.append(name)
        return result

    def schedule(self, name: str, depends: Callable[[], Any], compute: Callable[[], Any]) -> Deferred:
        """Stage ``name`` at this point of the pipeline, by the plan: ``COMPUTE`` runs it now (``run``);
        ``WAIT`` defers it, so that ``depends`` (which may read other stages) and the wait for the other
        worker happen when ``.value`` is first read, if ever; ``HAND_OFF`` ends this worker's share here
        (``StagesHandedOff``). Why deferred: a worker that waited for every stage as the pipeline reached
        it sat idle while own stages it could already run (its DCM) came later in the order."""
        action = COMPUTE if self.plan is None else self.plan(name)
        if action == HAND_OFF:
            raise StagesHandedOff(name, dict(self.timings))
        stage = Deferred(lambda: self.run(name, depends(), compute))
        if action == COMPUTE:
            stage.value  # read for its effect: this worker's own stages run now, in the pipeline's order
        return stage

    def _wait(self, name: str, key: str) -> Any:
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            time.sleep(self.poll_s)
            found = self.load(name, key)
            if found is not None:
                return found
        raise EtbenchError(f"stage {name}: another worker did not store it within {self.wait_s:.0f} s")
