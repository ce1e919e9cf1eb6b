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
    """Run lm-eval's own CLI with etbench's task directory on the include path. Its ``run`` without tasks or
    without a model argument (lm-eval raised a ValueError or TypeError, printed as a traceback) and an unknown
    task name (a ValueError) are one ``EtbenchError`` each, naming what to add."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    # lm_eval.__main__.cli_evaluate's steps, with the check of a run's arguments before it starts
    sys.argv = ["lm_eval", *with_include_path(args)]
    setup_logging()
    parser = HarnessCLI()
    parsed = parser.parse_args()
    if getattr(parsed, "command", None) == "run":
        check_run_args(parsed)
    try:
        parser.execute(parsed)
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):
            raise
        raise EtbenchError(f"lm-eval: {err} (etbench's task groups: {', '.join(TASK_GROUPS)}; `etbench lm-eval "
                           "--tasks list` lists every task)") from None


#: What ``lm-eval run`` passes to every model's constructor itself (not from ``--model_args``).
_RUN_MODEL_ARGS = frozenset({"batch_size", "max_batch_size", "device"})


def check_run_args(parsed) -> None:
    """An ``lm-eval run`` (``parsed`` by lm-eval's parser) names tasks and gives its model's constructor every
    argument it requires (``hf``: ``pretrained``), on the command line or in its ``--config`` file, which
    lm-eval merges the same way (a value given on the command line wins)."""
    import inspect

    from lm_eval.api.registry import get_model
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.utils import simple_parse_args_string

    from_file = {}
    if parsed.config:
        try:
            from_file = EvaluatorConfig.load_yaml_config(parsed.config)
        except (OSError, ValueError, TypeError) as err:
            raise EtbenchError(f"lm-eval: --config {parsed.config}: {err}") from None
    if not (parsed.tasks or from_file.get("tasks")):
        raise EtbenchError(f"lm-eval: no task given: add --tasks {TASK_GROUPS[0]} (etbench's task groups: "
                           f"{', '.join(TASK_GROUPS)}), e.g. `etbench lm-eval --model hf --model_args "
                           f"pretrained=DIR --tasks {TASK_GROUPS[0]}`")
    model = parsed.model or from_file.get("model") or "hf"  # lm-eval's default model
    given = from_file.get("model_args") or {}
    given = {**(simple_parse_args_string(given) if isinstance(given, str) else given), **(parsed.model_args or {})}
    try:
        init = inspect.signature(get_model(model).__init__)
    except ValueError as err:  # lm-eval's unknown model name
        raise EtbenchError(f"lm-eval: {err}") from None
    except ImportError as err:
        raise EtbenchError(f"lm-eval: model {model!r} needs a package that is not installed ({err})") from None
    required = [p.name for p in list(init.parameters.values())[1:]
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [name for name in required if name not in given and name not in _RUN_MODEL_ARGS]
    if missing:
        raise EtbenchError(f"lm-eval: model {model!r} needs {', '.join(missing)}: add --model_args "
                           + " ".join(f"{name}=..." for name in missing)
                           + (" (a model directory or hub id; `etbench models export MODEL DIR` writes one)"
                              if missing == ["pretrained"] else ""))


def main() -> None:
    """Console script ``etbench-lm-eval``."""
    try:
        run_lm_eval(sys.argv[1:])
    except EtbenchError as err:
        print(f"etbench: error: {err}", file=sys.stderr)
        sys.exit(2)
