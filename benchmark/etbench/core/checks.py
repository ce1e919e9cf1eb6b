"""Bounds on the sizes and counts a user gives, checked before any model is loaded or any work starts."""

from __future__ import annotations

from etbench.core.errors import EtbenchError

#: Prompts per measurement: 200x the paper's 500. Beyond this a run takes days and its JSONL gigabytes.
MAX_ITEMS = 100_000
#: Random circuits, completeness subsets and similar repeated draws.
MAX_DRAWS = 10_000
MAX_BATCH_SIZE = 4096
#: numpy and torch seeds are unsigned 32-bit.
MAX_SEED = 2**32 - 1


def check_range(value: int, option: str, low: int, high: int) -> int:
    """``value`` as given, or one ``EtbenchError`` naming ``option`` when it is not an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise EtbenchError(f"{option} must be between {low} and {high}, got {value!r}")
    return value


def check_items(value: int, option: str = "--n") -> int:
    return check_range(value, option, 1, MAX_ITEMS)


def check_draws(value: int, option: str) -> int:
    return check_range(value, option, 0, MAX_DRAWS)


def check_batch_size(value: int, option: str = "--batch-size") -> int:
    return check_range(value, option, 1, MAX_BATCH_SIZE)


def check_seed(value: int, option: str = "--seed") -> int:
    return check_range(value, option, 0, MAX_SEED)
