"""The task's chance level, and when a model's accuracy cannot be told apart from it.

A query is answered by naming one of the context's ``n_boxes`` objects, so guessing scores 1/n_boxes.
Faithfulness is circuit accuracy / model accuracy: when the model's own accuracy is at this floor, the
ratio compares two guesses and describes no mechanism (tiny-harmful, 7-box accuracy 0.138, has a
"faithfulness" of 1.074). Publishing marks such figures at display time (``at_chance``); nothing is
re-scored and the scorecard keeps the numbers as measured.
"""

from __future__ import annotations

from typing import Optional

from etbench.core.stats import Estimate

#: Box count of the faithfulness items (scoring evaluates circuits on 7-box prompts, as the paper does).
FAITHFULNESS_BOXES = 7


def chance_accuracy(n_boxes: int) -> float:
    """Accuracy of guessing among the context's ``n_boxes`` objects."""
    return 1.0 / n_boxes


def at_chance(accuracy: Optional[Estimate], n_boxes: int = FAITHFULNESS_BOXES) -> bool:
    """True when the 95% CI of ``accuracy`` contains the chance level 1/``n_boxes``: the model's accuracy is
    indistinguishable from guessing, and a ratio over it (faithfulness) describes nothing. False without an
    estimate or a CI (a figure reported without one cannot be tested)."""
    if accuracy is None or accuracy.low is None or accuracy.high is None:
        return False
    return accuracy.low <= chance_accuracy(n_boxes) <= accuracy.high
