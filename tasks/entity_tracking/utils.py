"""Documents of the entity_tracking tasks: built in memory by etbench's own generator (no files,
no hub), so the task never re-implements prompt generation."""

from __future__ import annotations

import datasets

from etbench.task.prompts import generate

# The few-shot pool uses another seed than the test items, so --num_fewshot never leaks test items.
FEWSHOT_SEED_OFFSET = 10_000
FEWSHOT_POOL = 50


def build_dataset(et_n_boxes: int = 7, et_n: int = 500, et_seed: int = 0, **_metadata) -> datasets.DatasetDict:
    """Called by lm-eval as ``build_dataset(**metadata, **dataset_kwargs)``; metadata (version,
    model args, ...) is ignored. ``et_`` prefixes keep these keys clear of model-arg names."""
    test = [ex.to_record() for ex in generate(n_boxes=et_n_boxes, n=et_n, seed=et_seed)]
    train = [ex.to_record() for ex in generate(n_boxes=et_n_boxes, n=FEWSHOT_POOL, seed=et_seed + FEWSHOT_SEED_OFFSET)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(test), "train": datasets.Dataset.from_list(train)})
