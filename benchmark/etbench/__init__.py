"""etbench: a benchmark of how fine-tuning changes a model's entity-tracking mechanism.

Modules, one concept each: ``data`` (prompts), ``layout`` (token positions for a tokenizer),
``counterfactuals`` (patching pairs and DCM desiderata), ``models`` (aliases and loading),
``accuracy`` (full-model accuracy), ``lm_eval_integration`` (the lm-eval task), ``cli``.
"""

__version__ = "0.1.0"
