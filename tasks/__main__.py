"""Print the task directory, for ``lm_eval --include_path "$(python -m etbench.lm_eval_tasks)"``."""

from pathlib import Path

print(Path(__file__).resolve().parent)
