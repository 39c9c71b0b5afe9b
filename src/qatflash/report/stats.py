"""The statistics behind every quality figure of the report, each defined once and computed with scipy.

- Seed spread: the mean of a figure over seeds ± a Student t-interval, cut to the range the figure
  cannot leave (`t_interval`).
- Test-set uncertainty of a difference: the paired bootstrap CI of the accuracy delta over the test
  examples (`paired_delta`: percentile method, 10,000 resamples, a fixed seed).
- McNemar's exact test of two models' disagreements (`mcnemar`).
- Macro-F1 over the test examples (`macro_f1`: the mean over classes of each class's F1, as the
  job's `test/f1` computes it) with its bootstrap CI, its paired delta to a reference's predictions
  of the same examples (`macro_f1_delta`, paired bootstrap), and the paired permutation test of
  that delta (`permutation`: each example's two predictions swapped at random, 10,000 resamples).
- Perplexity over evaluation windows (`perplexity`: exp(total NLL / tokens) with its bootstrap CI
  over the windows), a perplexity's relative change to a reference's on the same windows
  (`relative_perplexity`, paired bootstrap) and the Wilcoxon signed-rank test of the windows'
  per-token NLL differences (`wilcoxon`).
- Spearman's rank correlation of a proxy with what it predicts, with its paired bootstrap CI
  over the pairs (`spearman`: how well a sensitivity proxy ranks the groups).
- A verdict for a shipping decision from a delta's interval and a non-inferiority margin (`verdict`).
- The share of PTQ's loss a QAT of the same scheme recovers, (PTQ − QAT) / (PTQ − float) of the
  quality figure, with its paired bootstrap CI over the examples (`recovery`).

All take and give fractions (0.01 = one accuracy or F1 point, or 1 % of a perplexity), except the
margin, which is in points or percent as a reader states it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
IDENTICAL = "identical predictions"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided `CONFIDENCE` interval."""

    estimate: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (for a difference: whether it is significant)."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class SeedSpread:
    interval: Interval
    n: int
    t: float  # the t factor: half-width = t × standard error of the mean
    clipped: bool = False  # a bound is the figure's range, not the t-interval's


def t_interval(values: list[float] | np.ndarray, within: tuple[float, float] | None = None) -> SeedSpread:
    """Mean over `n` seeds ± t(0.975, n − 1) × the standard error; NaN bounds for one seed.

    `within` is the range the figure cannot leave (an accuracy's [0, 1]). The t-interval is
    symmetric, so seeds near a bound put part of it past the bound (99.33 ± 1.01 % reads
    [98.33, 100.34]); it is then cut to the range. That keeps its coverage: the true mean lies
    in the range, so what is cut off could never cover it. A bounded transform (logit) would not
    do better with three seeds and fails outright when a seed scores 100 %."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return SeedSpread(Interval(mean, float("nan"), float("nan")), n, float("nan"))
    t = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1))
    sem = float(stats.sem(values))
    if sem == 0:  # every seed gave the same figure: the interval is that point
        return SeedSpread(Interval(mean, mean, mean), n, t)
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
    if within is None:
        return SeedSpread(Interval(mean, float(low), float(high)), n, t)
    floor, ceiling = within
    clipped = low < floor or high > ceiling
    return SeedSpread(Interval(mean, max(float(low), floor), min(float(high), ceiling)), n, t, clipped)


def _bootstrap(samples: tuple[np.ndarray, ...], statistic: Any, paired: bool) -> Interval:
    """`statistic` of `samples` with its percentile bootstrap CI (the fixed resamples and seed above)."""
    result = stats.bootstrap(
        samples,
        statistic,
        paired=paired,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    estimate = float(statistic(*samples, axis=-1))
    return Interval(estimate, float(result.confidence_interval.low), float(result.confidence_interval.high))


def accuracy(correct: np.ndarray) -> Interval:
    """The share of correct examples (0/1 each) with its bootstrap percentile CI over the examples."""
    return _bootstrap((np.asarray(correct, dtype=float),), lambda a, axis: a.mean(axis=axis), paired=False)


def paired_delta(correct: np.ndarray, reference_correct: np.ndarray) -> Interval:
    """Accuracy of `correct` minus that of `reference_correct` (0/1 per example, same examples in the
    same order), with the paired bootstrap percentile CI over the examples."""
    samples = (np.asarray(correct, dtype=float), np.asarray(reference_correct, dtype=float))
    return _bootstrap(samples, lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis), paired=True)


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> Interval:
    """exp(sum of the windows' NLL / sum of their scored tokens), with the bootstrap percentile CI
    over windows (resampled whole, so a window's tokens stay together)."""
    samples = (np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float))
    return _bootstrap(samples, lambda n, t, axis: np.exp(n.sum(axis=axis) / t.sum(axis=axis)), paired=True)


def relative_perplexity(nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray) -> Interval:
    """A perplexity over the reference's on the same windows, minus 1 (0.02 = 2 % higher), with the
    paired bootstrap percentile CI over the windows."""
    samples = tuple(np.asarray(a, dtype=float) for a in (nll, reference_nll, tokens))
    return _bootstrap(
        samples,
        lambda n, r, t, axis: np.expm1((n.sum(axis=axis) - r.sum(axis=axis)) / t.sum(axis=axis)),
        paired=True,
    )


def recovery(samples: tuple[np.ndarray, ...], figures: Callable[..., tuple[Any, Any, Any]]) -> Interval:
    """(PTQ − QAT) / (PTQ − float), where `figures(*samples, axis)` gives the float, PTQ and QAT
    models' quality figures (any statistic: accuracy, perplexity, macro-F1) on the same examples:
    1 when QAT scores what float does, 0 when it scores what PTQ does. Paired bootstrap percentile
    CI over the examples, each resampled with all three models' results. A resample on which PTQ
    scores what float does gives ±inf, which lands in the tails (a denominator near zero shows as a
    wide interval, never a narrow one); one on which QAT does too has no recovery (0/0) and is left
    out of the percentiles."""

    def statistic(*arrays: np.ndarray, axis: int) -> Any:
        float_figure, ptq, qat = figures(*arrays, axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (ptq - qat) / (ptq - float_figure)

    return _bootstrap_where_defined(tuple(np.asarray(a, dtype=float) for a in samples), statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> Interval:
    """Spearman's rank correlation of paired values (a proxy against what it predicts) with the
    paired bootstrap percentile CI over the pairs. Sensitivities tie often (an accuracy change is a
    whole number of examples), so a resample in which either side is constant has no rank
    correlation: those resamples are left out of the percentiles."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if min(len(np.unique(a)), len(np.unique(b))) < 2:
        nan = float("nan")
        return Interval(nan, nan, nan)
    return _bootstrap_where_defined((a, b), lambda a, b, axis: _rank_correlation(a, b))


def _bootstrap_where_defined(samples: tuple[np.ndarray, ...], statistic: Any) -> Interval:
    """`statistic` of paired `samples` with its percentile bootstrap CI (the fixed resamples and seed
    above) over the resamples on which it is defined: scipy's bootstrap gives no interval once one
    resample is NaN. NaN bounds where none is. Each bound is an observed resample's value: an
    interpolation between two infinite ones (a recovery's denominator at 0) would give NaN."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, len(samples[0]), size=(BOOTSTRAP_RESAMPLES, len(samples[0])))
    resampled = np.asarray(statistic(*(s[picks] for s in samples), axis=-1), dtype=float)
    kept = resampled[~np.isnan(resampled)]
    tail = (1 - CONFIDENCE) / 2 * 100
    bounds = np.percentile(kept, [tail, 100 - tail], method="nearest") if kept.size else [float("nan")] * 2
    return Interval(float(statistic(*samples, axis=-1)), float(bounds[0]), float(bounds[1]))


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's correlation of the ranks along the last axis (ties share their mean rank)."""
    ra, rb = (stats.rankdata(v, axis=-1) for v in (a, b))
    ra, rb = (r - r.mean(axis=-1, keepdims=True) for r in (ra, rb))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (ra * rb).sum(axis=-1) / np.sqrt((ra**2).sum(axis=-1) * (rb**2).sum(axis=-1))


def wilcoxon(nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray) -> float:
    """The two-sided Wilcoxon signed-rank p of the windows' per-token NLL differences (1.0 when
    every window scores the same)."""
    difference = (np.asarray(nll, dtype=float) - np.asarray(reference_nll, dtype=float)) / tokens
    if not np.any(difference):
        return 1.0
    return float(stats.wilcoxon(difference).pvalue)


def _macro_f1(target: np.ndarray, prediction: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean over classes of 2 TP / (2 TP + FP + FN) along `axis` (every row of a batch of
    resamples at once). A class neither a target nor a prediction of the examples has no F1 and is
    left out of the mean, as torchmetrics' macro F1 (the job's `test/f1`) leaves it out, so a
    resample that misses a rare class scores the classes it has."""
    scores = []
    for label in range(int(max(np.max(target), np.max(prediction))) + 1):
        truth, said = target == label, prediction == label
        hits = 2 * (truth & said).sum(axis=axis)
        misses = (truth ^ said).sum(axis=axis)  # false positives and false negatives
        scores.append(np.where(hits + misses > 0, hits / np.maximum(hits + misses, 1), np.nan))
    return np.nanmean(scores, axis=0)


def macro_f1(target: np.ndarray, prediction: np.ndarray) -> Interval:
    """Macro-F1 of class-index predictions with its bootstrap percentile CI over the examples (each
    resampled with its target)."""
    samples = (np.asarray(target), np.asarray(prediction))
    return _bootstrap(samples, _macro_f1, paired=True)


def macro_f1_delta(target: np.ndarray, prediction: np.ndarray, reference_prediction: np.ndarray) -> Interval:
    """Macro-F1 of `prediction` minus that of `reference_prediction` (same examples, same order),
    with the paired bootstrap percentile CI over the examples."""
    samples = (np.asarray(target), np.asarray(prediction), np.asarray(reference_prediction))
    return _bootstrap(
        samples, lambda t, p, r, axis: _macro_f1(t, p, axis) - _macro_f1(t, r, axis), paired=True
    )


def permutation(target: np.ndarray, prediction: np.ndarray, reference_prediction: np.ndarray) -> float:
    """The two-sided p of the paired permutation test of a macro-F1 delta (approximate
    randomisation): under no difference either model could have made either prediction of an
    example, so each example's two are swapped at random (exactly, over every swap, for 13 examples
    or fewer). Macro-F1 is no mean over examples, so McNemar's count of disagreements cannot test it."""
    target = np.asarray(target)
    result = stats.permutation_test(
        (np.asarray(prediction), np.asarray(reference_prediction)),
        lambda p, r, axis: _macro_f1(target, p, axis) - _macro_f1(target, r, axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return float(result.pvalue)


@dataclass(frozen=True)
class McNemar:
    b: int  # examples the reference gets right and the model wrong
    c: int  # examples the model gets right and the reference wrong
    p: float
    note: str | None = None


def mcnemar(correct: np.ndarray, reference_correct: np.ndarray) -> McNemar:
    """McNemar's exact test: `binomtest(b, b + c, 0.5)` over the examples the two models disagree on
    (two-sided). With no disagreement, p = 1 and the note says the predictions are identical."""
    correct = np.asarray(correct, dtype=bool)
    reference_correct = np.asarray(reference_correct, dtype=bool)
    b = int((reference_correct & ~correct).sum())
    c = int((correct & ~reference_correct).sum())
    if b + c == 0:
        return McNemar(0, 0, 1.0, IDENTICAL)
    return McNemar(b, c, float(stats.binomtest(b, b + c, 0.5).pvalue))


def verdict(delta: Interval, margin_points: float, higher_is_better: bool = True) -> str:
    """What a shipping decision reads from a delta's interval, checked in order: better (lower bound
    above 0), non-inferior (lower bound above −margin), worse (upper bound below −margin), else
    inconclusive. For a figure where lower is better (perplexity) the delta is read negated. No
    interval, no verdict."""
    margin = margin_points / 100
    if not higher_is_better:
        delta = Interval(-delta.estimate, -delta.high, -delta.low)
    if np.isnan(delta.low) or np.isnan(delta.high):
        return "no interval"
    if delta.low > 0:
        return "better"
    if delta.low > -margin:
        return "non-inferior"
    if delta.high < -margin:
        return "worse"
    return "inconclusive"
