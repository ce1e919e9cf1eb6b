"""Using the entity_tracking task from lm-eval without a checkout.

lm-eval 0.4.13 only finds tasks in its own tree or under ``--include_path``; it reads no entry
points yet. So etbench ships the task YAMLs as package data and offers: the directory for
``--include_path``, a TaskManager for Python use, and ``etbench-lm-eval`` (= ``lm_eval`` with that
include path added).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from etbench.core.errors import EtbenchError

TASK_GROUPS = ("entity_tracking", "entity_tracking_mc")


def tasks_dir() -> Path:
    """Directory holding the task YAMLs (``tasks/`` in a checkout, installed as package data)."""
    return Path(str(resources.files("etbench.lm_eval_tasks")))


def task_manager(extra_paths: list[str] | None = None, include_defaults: bool = True, **kwargs):
    """An lm-eval TaskManager that knows etbench's tasks (``include_defaults=False`` indexes only
    ours, in milliseconds instead of the ~10 s lm-eval needs for its 14k built-in tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(tasks_dir()), *(extra_paths or [])], include_defaults=include_defaults,
                       **kwargs)


def with_include_path(args: list[str]) -> list[str]:
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        return list(args)
    return [*args, "--include_path", str(tasks_dir())]


def run_lm_eval(args: list[str]) -> None:
    """Run lm-eval's own CLI with etbench's task directory on the include path. An unknown task name (lm-eval
    raises a ValueError, printed as a traceback) is one ``EtbenchError`` naming it and etbench's tasks."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *with_include_path(args)]
    try:
        cli_evaluate()
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):
            raise
        raise EtbenchError(f"lm-eval: {err} (etbench's task groups: {', '.join(TASK_GROUPS)}; `etbench lm-eval "
                           "--tasks list` lists every task)") from None


def main() -> None:
    """Console script ``etbench-lm-eval``."""
    try:
        run_lm_eval(sys.argv[1:])
    except EtbenchError as err:
        print(f"etbench: error: {err}", file=sys.stderr)
        sys.exit(2)
