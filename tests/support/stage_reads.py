"""The stage results ``etbench score`` reads, in order, under a score-many side's plan, found without
computing anything: a stage cache that answers every read with a placeholder (no model is loaded,
nothing waits) and a scorecard assembly that stops the run. For the schedule's unit test and
tests/bench/bench_side_schedule.py."""

from __future__ import annotations

import tempfile
from typing import Any, Callable

from etbench.schema.circuit import Circuit
from etbench.scoring import pipeline
from etbench.scoring.stages import COMPUTE, StageCache, StagesHandedOff


class _Assembled(Exception):
    pass


def stage_reads(plan: Callable[[str], str] | None, preset: str = "standard",
                base: str = "tiny-base", ft: str = "tiny-ft") -> tuple[list[tuple[str, str]], str | None]:
    """(every (stage, plan action) ``pipeline.score`` reads, in order, up to assembling the scorecard
    or handing off; the stage it handed off at, or None when it assembled the scorecard)."""
    reads: list[tuple[str, str]] = []

    class PlaceholderCache(StageCache):
        def run(self, name: str, depends: Any, compute: Callable[[], Any]) -> Any:
            reads.append((name, COMPUTE if self.plan is None else self.plan(name)))
            if name.startswith("circuit_"):  # a real circuit: the edges stages' key reads its node set
                return {"circuit": Circuit.from_heads({"A": [[29, 0]]}, n_layers=30, n_heads=9).to_dict(),
                        "stands_for": name}
            return {"selections": [], "stands_for": name}

    def assemble(*args: Any, **kwargs: Any) -> None:
        raise _Assembled  # its arguments, every result the scorecard reads, were read before this call

    saved = pipeline.StageCache, pipeline.assemble_scorecard
    pipeline.StageCache, pipeline.assemble_scorecard = PlaceholderCache, assemble
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            pipeline.score(base, ft, out_dir, preset=preset, stage_plan=plan, progress=False)
    except StagesHandedOff as handed:
        return reads, handed.stage
    except _Assembled:
        return reads, None
    finally:
        pipeline.StageCache, pipeline.assemble_scorecard = saved
    raise AssertionError("score neither assembled a scorecard nor handed off")
