"""Confidence intervals and paired tests (scipy/statsmodels underneath).

Everything here compares or summarises per-item outcomes *on the same items*, which is what the
benchmark produces: paired tests are more powerful than lm-eval's unpaired z-test and are the right
ones when two models answer one prompt set.

Results are small frozen dataclasses. ``Interval`` is the in-memory form of an estimate;
``to_estimate`` turns it (or a ``Proportion``) into ``scorecard.Estimate``, the on-disk form.
Every resampling function takes a ``seed`` and is deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

DEFAULT_RESAMPLES = 5000
BootMethod = Literal["BCa", "percentile", "basic"]


@dataclass
class Estimate:
    """A point estimate with its two-sided confidence interval."""

    # The on-disk form of every estimate a scorecard holds: ``Proportion`` and ``Interval`` are what the
    # statistics compute, ``to_estimate`` stores them as this (the docstring above is the JSON Schema's).

    value: Optional[float]  # None when undefined (e.g. a normalised gain with ft acc == base acc)
    low: Optional[float]
    high: Optional[float]
    n: int
    method: str  # "wilson", "paired-bootstrap", "bootstrap-over-seeds", ...
    level: float = 0.95
    note: str = ""  # why a value is undefined, or anything a reader must know


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


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided CI. ``value`` is None when the quantity is undefined."""

    value: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int
    method: str
    level: float = 0.95
    note: str = ""
    p_value: Optional[float] = None  # of the matching test of "no difference", where there is one


@dataclass(frozen=True)
class TestResult:
    """A hypothesis test: the observed statistic and its (unadjusted) p-value."""

    statistic: float
    p_value: float
    n: int
    method: str
    alternative: str = "two-sided"


@dataclass(frozen=True)
class McNemar:
    """Paired accuracy of two models on the same n items (A = reference, B = compared).

    ``b_only`` items only B gets right, ``a_only`` items only A gets right. ``difference`` is
    acc(B) - acc(A) with a paired bootstrap CI; ``p_value`` is the exact McNemar test (binomial on
    the discordant pairs). Effect sizes: ``odds_ratio`` = b_only / a_only (the conditional odds
    ratio of the discordant pairs, exact CI from the binomial Clopper-Pearson interval) and Cohen's
    ``cohens_g`` = b_only / (a_only + b_only) - 0.5 (signed: > 0 when B wins more discordant pairs).
    """

    n: int
    both: int
    a_only: int
    b_only: int
    neither: int
    acc_a: float
    acc_b: float
    difference: Interval
    p_value: float
    odds_ratio: Interval
    cohens_g: float
    method: str = "exact McNemar (binomial on discordant pairs)"


def _as_1d(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    return a, b


def _boot_interval(data: tuple[np.ndarray, ...], statistic, value: float, *, paired: bool, seed: int,
                   level: float, n_resamples: int, method: BootMethod, label: str,
                   constant: bool = False) -> Interval:
    """Run scipy's bootstrap; a sample with no spread gives the point as its own CI (BCa would be nan).

    ``constant``: the caller knows every resample gives ``value`` (e.g. all paired differences equal).
    """
    from scipy.stats import bootstrap

    n = int(data[0].size)
    if n == 0:
        return Interval(None, None, None, 0, label, level, "no items")
    if n == 1 or constant or all(np.ptp(d) == 0 for d in data):
        return Interval(value, value, value, n, label, level, "no variation across items: CI is the point")
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=n_resamples,
                            confidence_level=level, method=method, rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    note = ""
    if not (math.isfinite(low) and math.isfinite(high)) and method == "BCa":
        # BCa needs a jackknife with spread; fall back to the percentile interval.
        return _boot_interval(data, statistic, value, paired=paired, seed=seed, level=level,
                              n_resamples=n_resamples, method="percentile", label=label.replace("BCa", "percentile"),
                              constant=constant)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    undefined = int(np.sum(~np.isfinite(dist)))
    if undefined and method == "percentile" and undefined < dist.size:
        # e.g. a ratio whose denominator is 0 in some resamples: those resamples are dropped and said so
        alpha = (1 - level) / 2
        low, high = (float(q) for q in np.nanpercentile(np.where(np.isfinite(dist), dist, np.nan),
                                                        [100 * alpha, 100 * (1 - alpha)]))
        note = f"{undefined} of {dist.size} resamples undefined (zero denominator) and dropped"
    return Interval(value, low, high, n, label, level, note)


def bootstrap_mean(x: Sequence[float], *, seed: int = 0, level: float = 0.95,
                   n_resamples: int = DEFAULT_RESAMPLES, method: BootMethod = "BCa") -> Interval:
    """Mean of per-item values with a bootstrap CI over items."""
    x = _as_1d(x, "x")
    value = float(x.mean()) if x.size else None
    return _boot_interval((x,), lambda s, axis=-1: np.mean(s, axis=axis), value, paired=False, seed=seed,
                          level=level, n_resamples=n_resamples, method=method, label=f"bootstrap-{method}")


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], *, seed: int = 0, level: float = 0.95,
                          n_resamples: int = DEFAULT_RESAMPLES, method: BootMethod = "BCa") -> Interval:
    """mean(b) - mean(a) over the same items, CI from resampling items (pairs kept together)."""
    a, b = _paired(a, b)
    value = float(b.mean() - a.mean()) if a.size else None

    def stat(x, y, axis=-1):
        return np.mean(y, axis=axis) - np.mean(x, axis=axis)

    return _boot_interval((a, b), stat, value, paired=True, seed=seed, level=level, n_resamples=n_resamples,
                          method=method, label=f"paired-bootstrap-{method}",
                          constant=bool(a.size) and np.ptp(b - a) == 0)


def paired_bootstrap_ratio(num: Sequence[float], den: Sequence[float], *, seed: int = 0, level: float = 0.95,
                           n_resamples: int = DEFAULT_RESAMPLES, method: BootMethod = "percentile") -> Interval:
    """mean(num) / mean(den) over the same items (e.g. faithfulness = circuit acc / model acc).

    Undefined (value None) when mean(den) is 0. Percentile by default: resamples where the
    denominator is 0 are rare for real accuracies and BCa's jackknife is fragile around them.
    """
    num, den = _paired(num, den)
    if not num.size or den.mean() == 0:
        return Interval(None, None, None, int(num.size), f"paired-bootstrap-{method}", level,
                        "denominator is 0: ratio undefined")
    value = float(num.mean() / den.mean())

    def stat(x, y, axis=-1):
        d = np.mean(y, axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d == 0, np.nan, np.mean(x, axis=axis) / np.where(d == 0, 1, d))

    return _boot_interval((num, den), stat, value, paired=True, seed=seed, level=level, n_resamples=n_resamples,
                          method=method, label=f"paired-bootstrap-{method}")


def normalised_gain(base: Sequence[float], ft: Sequence[float], patched: Sequence[float], *, seed: int,
                    n_resamples: int) -> Estimate:
    """(patched - base) / (ft - base) accuracy over the same items, with its paired bootstrap CI; value None
    (with a note) when the fine-tuned model's gain over the base has a paired 95% CI containing 0, where
    the ratio is unbounded. Scoring and the submission check both call this."""
    gap = paired_bootstrap_diff(base, ft, seed=seed, n_resamples=n_resamples)
    if gap.value is None or gap.value == 0 or (gap.low is not None and gap.low <= 0 <= gap.high):
        why = ("ft accuracy equals base accuracy" if not gap.value else
               f"ft - base accuracy {format_estimate(gap.value, gap.low, gap.high, signed=True)} is not clearly nonzero")
        return Estimate(None, None, None, len(base), "paired-bootstrap-percentile", gap.level,
                        f"{why}: normalised gain undefined")
    ratio = paired_bootstrap_ratio([p - b for p, b in zip(patched, base)], [f - b for f, b in zip(ft, base)],
                                   seed=seed, n_resamples=n_resamples)
    return to_estimate(ratio)


def paired_bootstrap(data: Sequence[Sequence[float]], statistic, *, seed: int = 0, level: float = 0.95,
                     n_resamples: int = DEFAULT_RESAMPLES, method: BootMethod = "percentile",
                     label: str = "paired-bootstrap") -> Interval:
    """Any statistic of several per-item arrays over the same items, e.g. a difference of two ratios.

    ``statistic(*arrays, axis=-1)`` must be vectorised (numpy reductions along ``axis``); a nan
    result for a resample (e.g. a zero denominator) is ignored by the percentile interval.
    """
    arrays = tuple(_as_1d(d, f"data[{i}]") for i, d in enumerate(data))
    if len({a.size for a in arrays}) > 1:
        raise ValueError("paired samples differ in length: " + " vs ".join(str(a.size) for a in arrays))
    if not arrays[0].size:
        return Interval(None, None, None, 0, f"{label}-{method}", level, "no items")
    with np.errstate(all="ignore"):
        value = float(statistic(*arrays, axis=-1))
    if not math.isfinite(value):
        return Interval(None, None, None, int(arrays[0].size), f"{label}-{method}", level, "statistic undefined")
    return _boot_interval(arrays, statistic, value, paired=True, seed=seed, level=level, n_resamples=n_resamples,
                          method=method, label=f"{label}-{method}")


def permutation_test_paired(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
                            n_resamples: int = 9999, alternative: str = "two-sided") -> TestResult:
    """Sign-flip test of mean(b - a) = 0 (scipy ``permutation_test``, ``permutation_type='samples'``)."""
    from scipy.stats import permutation_test

    a, b = _paired(a, b)
    diff = b - a
    if diff.size == 0 or np.all(diff == 0):
        return TestResult(0.0, 1.0, int(diff.size), "paired permutation (sign flip)", alternative)

    def stat(x, axis=-1):
        return np.mean(x, axis=axis)

    # one-sample paired form: permuting 'samples' of a single array flips signs
    res = permutation_test((diff,), stat, permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                           alternative=alternative, rng=np.random.default_rng(seed))
    return TestResult(float(res.statistic), float(res.pvalue), int(diff.size), "paired permutation (sign flip)",
                      alternative)


def permutation_test_independent(a: Sequence[float], b: Sequence[float], *, seed: int = 0,
                                 n_resamples: int = 9999, alternative: str = "two-sided") -> TestResult:
    """Difference of means of two independent samples (labels shuffled)."""
    from scipy.stats import permutation_test

    a, b = _as_1d(a, "a"), _as_1d(b, "b")

    def stat(x, y, axis=-1):
        return np.mean(y, axis=axis) - np.mean(x, axis=axis)

    res = permutation_test((a, b), stat, permutation_type="independent", vectorized=True,
                           n_resamples=n_resamples, alternative=alternative, rng=np.random.default_rng(seed))
    return TestResult(float(res.statistic), float(res.pvalue), int(a.size + b.size), "permutation (independent)",
                      alternative)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], *, seed: int = 0, level: float = 0.95,
            n_resamples: int = DEFAULT_RESAMPLES) -> McNemar:
    """Exact McNemar test of acc(A) = acc(B) on the same items, with effect sizes."""
    from scipy.stats import binomtest
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    a, b = _paired(a_correct, b_correct)
    a, b = a.astype(bool), b.astype(bool)
    n = int(a.size)
    both, a_only = int(np.sum(a & b)), int(np.sum(a & ~b))
    b_only, neither = int(np.sum(~a & b)), int(np.sum(~a & ~b))
    discordant = a_only + b_only
    if discordant == 0:
        p = 1.0
        odds = Interval(None, None, None, 0, "discordant odds ratio (exact)", level, "no discordant pairs")
        g = 0.0
    else:
        p = float(sm_mcnemar([[both, a_only], [b_only, neither]], exact=True).pvalue)
        ci = binomtest(b_only, discordant).proportion_ci(confidence_level=level, method="exact")

        def odds_of(q: float) -> float:
            return q / (1 - q) if q < 1 else math.inf

        value = b_only / a_only if a_only else math.inf
        odds = Interval(value, odds_of(ci.low), odds_of(ci.high), discordant, "discordant odds ratio (exact)",
                        level)
        g = b_only / discordant - 0.5
    diff = paired_bootstrap_diff(a.astype(float), b.astype(float), seed=seed, level=level, n_resamples=n_resamples)
    diff = Interval(diff.value, diff.low, diff.high, diff.n, diff.method, diff.level, diff.note, p)
    return McNemar(n, both, a_only, b_only, neither, float(a.mean()) if n else math.nan,
                   float(b.mean()) if n else math.nan, diff, p, odds, g)


@dataclass(frozen=True)
class Adjusted:
    """p-values corrected for multiple comparisons, in the input order."""

    p_values: tuple[float, ...]
    adjusted: tuple[float, ...]
    reject: tuple[bool, ...]
    method: str
    alpha: float


_ADJUST_METHODS = {"holm": "holm", "bh": "fdr_bh", "fdr_bh": "fdr_bh", "bonferroni": "bonferroni"}


def adjust_pvalues(p_values: Sequence[float], method: str = "holm", alpha: float = 0.05) -> Adjusted:
    """Holm (family-wise error) or Benjamini-Hochberg ("bh", false discovery rate) via statsmodels."""
    from statsmodels.stats.multitest import multipletests

    if method not in _ADJUST_METHODS:
        raise ValueError(f"unknown correction {method!r}: use one of {sorted(_ADJUST_METHODS)}")
    ps = tuple(float(p) for p in p_values)
    if not ps:
        return Adjusted((), (), (), method, alpha)
    reject, adj, _, _ = multipletests(ps, alpha=alpha, method=_ADJUST_METHODS[method])
    return Adjusted(ps, tuple(float(x) for x in adj), tuple(bool(r) for r in reject), method, alpha)


def _clean(x: Optional[float]) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def to_estimate(x: Interval | Proportion, note: str | None = None) -> Estimate:
    """The on-disk form (``scorecard.Estimate``). Non-finite numbers become None (JSON has no nan)."""
    if isinstance(x, Proportion):
        return Estimate(_clean(x.value), _clean(x.low), _clean(x.high), x.n, x.method, x.level,
                        note if note is not None else ("" if x.n else "no items"))
    return Estimate(_clean(x.value), _clean(x.low), _clean(x.high), x.n, x.method, x.level,
                    note if note is not None else x.note)


def from_estimate(e: Estimate) -> Interval:
    return Interval(e.value, e.low, e.high, e.n, e.method, e.level, e.note)


# ---------------------------------------------------------------------------------------------
# Display: the one way an estimate or a p-value is written in tables, reports and pages


def format_estimate(value: Optional[float], low: Optional[float] = None, high: Optional[float] = None, *,
                    note: str = "", undefined: str = "—", signed: bool = False, digits: int = 3) -> str:
    """``0.812 [0.771, 0.848]``. The interval is left out when it is missing or of width zero (a point is
    not a confidence interval); an undefined value is ``undefined`` plus its note in parentheses."""
    if value is None:
        return undefined + (f" ({note})" if note else "")
    sign = "+" if signed else ""
    text = f"{value:{sign}.{digits}f}"
    if low is None or high is None or low == high:
        return text
    return f"{text} [{low:{sign}.3f}, {high:{sign}.3f}]"


def format_estimate_of(e: Optional[Estimate], *, undefined: str = "—", signed: bool = False,
                       show_note: bool = True) -> str:
    """``format_estimate`` of an ``Estimate`` (None reads as undefined)."""
    if e is None:
        return undefined
    return format_estimate(e.value, e.low, e.high, note=e.note if show_note else "", undefined=undefined,
                           signed=signed)


def format_p(p: Optional[float]) -> str:
    """A p-value: 3 decimals, or scientific notation below 0.001."""
    if p is None:
        return "—"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def ratio_of_sums_ci(num_flags: Sequence[bool], den_flags: Sequence[bool], *, seed: int, draws: int = 2000,
                     level: float = 0.95) -> tuple[float, float]:
    """Paired percentile bootstrap CI of sum(num)/sum(den) over items (faithfulness = circuit correct /
    model correct); (nan, nan) when there are no items or no correct denominator. Scoring and the
    submission check both call this, so a published CI can be re-derived exactly."""
    c = np.asarray(num_flags, dtype=float)
    m = np.asarray(den_flags, dtype=float)
    if len(c) == 0 or m.sum() == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), size=(draws, len(c)))
    num, den = c[idx].sum(1), m[idx].sum(1)
    ratios = num[den > 0] / den[den > 0]
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paper_ratio(circuit_acc: float, model_acc: float) -> float:
    """The paper's faithfulness: circuit accuracy / model accuracy (nan when the model scores 0)."""
    return circuit_acc / model_acc if model_acc > 0 else float("nan")


def mib_normalised(circuit_acc: float, model_acc: float, empty_acc: float) -> float:
    """MIB's (m(C) - m(∅)) / (m(N) - m(∅)); nan when the model is no better than the empty circuit."""
    gap = model_acc - empty_acc
    return (circuit_acc - empty_acc) / gap if gap > 0 else float("nan")


def mib_ci(circuit_flags: Sequence[bool], model_flags: Sequence[bool], none_flags: Sequence[bool], seed: int = 0,
           draws: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Paired percentile bootstrap CI (over items) of MIB's (m(C) - m(∅)) / (m(N) - m(∅)); resamples where
    the model is no better than the empty circuit are left out (nan when all are)."""
    c, m, z = (np.asarray(x, dtype=float) for x in (circuit_flags, model_flags, none_flags))
    if len(c) == 0 or not len(c) == len(m) == len(z):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), size=(draws, len(c)))
    num, den = (c[idx] - z[idx]).sum(1), (m[idx] - z[idx]).sum(1)
    ok = den > 0
    if not ok.any():
        return float("nan"), float("nan")
    lo, hi = np.quantile(num[ok] / den[ok], [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
