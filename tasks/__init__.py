"""lm-eval task configs of etbench.

In a checkout this is ``tasks/`` (``lm_eval --include_path tasks ...``); an installed etbench ships
the same files as the package ``etbench.lm_eval_tasks`` (``python -m etbench.lm_eval_tasks``
prints its directory for ``--include_path``).
"""
