"""Confidence intervals and paired tests (scipy/statsmodels underneath)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Proportion:
    """k successes of n with a two-sided confidence interval."""

    k: int
    n: int
    low: float
    high: float
    level: float = 0.95
    method: str = "wilson"

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")


def proportion_ci(k: int, n: int, level: float = 0.95) -> Proportion:
    """Wilson score interval: good coverage near 0 and 1, where accuracies of weak models sit."""
    from scipy.stats import binomtest

    if n == 0:
        return Proportion(0, 0, float("nan"), float("nan"), level)
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return Proportion(k, n, float(ci.low), float(ci.high), level)
