"""Quality with its uncertainty: every tested model of every training point against its FP32 reference.

A quantized point's reference is the FP32 point of the same sweep whose config is equal but for
`quant` and `benchmark` (results.json's `reference_hash`): the same seed, data and test set. An
FP32 point is its own reference, for the other models it tested (ONNX Runtime's). From both
points' `examples.parquet` each model gets its quality figure with a bootstrap CI, the paired delta
to the reference's FP32 model with its CI, a paired test and a verdict (`qatflash.report.stats`),
all by the statistic the point's task declares (results.json's `task.quality`, one of `STATISTICS`):

- `accuracy` (examples with a `prediction`): accuracy, its delta in points, McNemar's test;
- `macro_f1`: macro-F1, its delta in F1 points, the paired permutation test;
- `ppl` (examples with a window `nll`): perplexity per token and per word, its relative change in
  percent, the Wilcoxon signed-rank test over windows.

Points that differ only in `seed` (`seed_group_hash`) are then summarised as mean ± t-interval over
the seeds (a fraction's cut to [0, 1]), and the verdict of a group reads the t-interval of its
deltas. Each statistic has its own non-inferiority margin, in its own unit (`Margins`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from qatflash.report.stats import (
    IDENTICAL,
    Interval,
    SeedSpread,
    _macro_f1,
    accuracy,
    macro_f1,
    macro_f1_delta,
    mcnemar,
    paired_delta,
    permutation,
    perplexity,
    recovery,
    relative_perplexity,
    t_interval,
    verdict,
    wilcoxon,
)
from qatflash.results import EXAMPLES_FILE, FLOAT, read_examples

REFERENCE_MODEL = FLOAT  # the model every other is compared with
OTHER_WINDOWS = "no interval: the reference was tested on other examples"
NO_EXAMPLES = f"no interval: the point has no {EXAMPLES_FILE} (recorded before per-example results)"
NO_REFERENCE = "no interval: no float point of the same config but quant and benchmark"


class Statistic(ABC):
    """A quality statistic a task can be judged by, computed from its examples.parquet columns.

    A task names one (`Task.quality`, recorded as results.json's `task.quality`) and the report
    reads the name, so adding a task with another headline figure is a declaration, not a report
    change. `name` is also the figure's column in the quality tables and its `Margins` field."""

    name: ClassVar[str]
    # The examples' columns it reads; the reference must have every example with these, and equal
    # `same` ones (the target of an example, the tokens of a window), or it tested other examples.
    columns: ClassVar[tuple[str, ...]]
    same: ClassVar[str]
    test_p: ClassVar[str]  # the column of its paired test's p
    unit: ClassVar[str]  # of its delta and margin, as a reader states them: "pt" (points) or "%"
    margin: ClassVar[float]  # the default non-inferiority margin, in `unit`
    higher_is_better: ClassVar[bool] = True
    within: ClassVar[tuple[float, float] | None] = None  # the range it cannot leave (a fraction's)

    @abstractmethod
    def measure(self, frame: pd.DataFrame, point: pd.Series) -> dict[str, Any]:
        """One model's figure with its CI (`name`, `name_low`, `name_high`), and what goes beside it."""

    @abstractmethod
    def delta(self, frame: pd.DataFrame, reference: pd.DataFrame) -> Interval:
        """The paired delta to the reference's rows of the same examples (in `frame`'s order) with
        its CI, as a fraction (0.01: one point, or 1 %)."""

    @abstractmethod
    def compare(
        self, frame: pd.DataFrame, reference: pd.DataFrame, point: pd.Series
    ) -> tuple[Interval, dict[str, Any]]:
        """`delta`, and the paired test's columns beside it."""

    def harm(self, delta: Interval) -> Interval:
        """What a delta loses, in the reader's unit (points or percent; below zero: a gain)."""
        sign = -100.0 if self.higher_is_better else 100.0
        low, high = sorted((sign * delta.low, sign * delta.high))
        return Interval(sign * delta.estimate, low, high)

    @abstractmethod
    def recovery(self, float_frame: pd.DataFrame, ptq: pd.DataFrame, qat: pd.DataFrame) -> Interval:
        """(PTQ − QAT) / (PTQ − float) of this figure, the three frames holding the same examples in
        the same order (`qatflash.report.recovery`), with its paired bootstrap CI."""

    def verdict(self, delta: Interval, margins: Margins) -> str:
        """The verdict of a delta at this statistic's own margin, read in its direction."""
        return verdict(delta, margins.of(self.name), higher_is_better=self.higher_is_better)


class _OfLabels(Statistic):
    """A statistic of predicted labels against their targets: in points, within [0, 1]."""

    columns = ("target", "prediction")
    same = "target"
    unit = "pt"
    margin = 1.0
    within = (0.0, 1.0)


class Accuracy(_OfLabels):
    """The share of examples right; McNemar's exact test counts the examples the two disagree on."""

    name = "accuracy"
    test_p = "mcnemar_p"

    def measure(self, frame: pd.DataFrame, point: pd.Series) -> dict[str, Any]:
        return _columns(self.name, accuracy(_correct(frame)))

    def delta(self, frame: pd.DataFrame, reference: pd.DataFrame) -> Interval:
        return paired_delta(_correct(frame), _correct(reference))

    def compare(
        self, frame: pd.DataFrame, reference: pd.DataFrame, point: pd.Series
    ) -> tuple[Interval, dict[str, Any]]:
        test = mcnemar(_correct(frame), _correct(reference))
        columns = {"mcnemar_b": test.b, "mcnemar_c": test.c, "mcnemar_p": test.p, "note": test.note}
        return self.delta(frame, reference), columns

    def recovery(self, float_frame: pd.DataFrame, ptq: pd.DataFrame, qat: pd.DataFrame) -> Interval:
        samples = tuple(_correct(frame) for frame in (float_frame, ptq, qat))
        return recovery(samples, lambda *correct, axis: tuple(c.mean(axis=axis) for c in correct))


class MacroF1(_OfLabels):
    """The mean of the classes' F1: a class the model gives up on costs its whole share, however
    few examples it has, where accuracy loses only those examples."""

    name = "macro_f1"
    test_p = "permutation_p"

    def measure(self, frame: pd.DataFrame, point: pd.Series) -> dict[str, Any]:
        return _columns(self.name, macro_f1(frame["target"].to_numpy(), frame["prediction"].to_numpy()))

    def delta(self, frame: pd.DataFrame, reference: pd.DataFrame) -> Interval:
        target, prediction = frame["target"].to_numpy(), frame["prediction"].to_numpy()
        return macro_f1_delta(target, prediction, reference["prediction"].to_numpy())

    def compare(
        self, frame: pd.DataFrame, reference: pd.DataFrame, point: pd.Series
    ) -> tuple[Interval, dict[str, Any]]:
        target, prediction = frame["target"].to_numpy(), frame["prediction"].to_numpy()
        theirs = reference["prediction"].to_numpy()
        columns = {
            "permutation_p": permutation(target, prediction, theirs),
            "note": IDENTICAL if np.array_equal(prediction, theirs) else None,
        }
        return self.delta(frame, reference), columns

    def recovery(self, float_frame: pd.DataFrame, ptq: pd.DataFrame, qat: pd.DataFrame) -> Interval:
        predictions = tuple(frame["prediction"].to_numpy() for frame in (float_frame, ptq, qat))
        return recovery(
            (qat["target"].to_numpy(), *predictions),
            lambda target, *said, axis: tuple(_macro_f1(target, p, axis) for p in said),
        )


class Perplexity(Statistic):
    """Per token over the windows, and per word: the per-token one to the power tokens/words of the
    split (the same total NLL over the words), so its interval and change are the same transform."""

    name = "ppl"
    columns = ("nll", "tokens")
    same = "tokens"
    test_p = "wilcoxon_p"
    unit = "%"
    margin = 2.0
    higher_is_better = False

    def measure(self, frame: pd.DataFrame, point: pd.Series) -> dict[str, Any]:
        measured = perplexity(frame["nll"].to_numpy(), frame["tokens"].to_numpy())
        per_word = _tokens_per_word(point)
        return {
            **_columns(self.name, measured),
            **_columns(
                "word_ppl",
                Interval(measured.estimate**per_word, measured.low**per_word, measured.high**per_word),
            ),
            "tokens": int(frame["tokens"].sum()),
        }

    def delta(self, frame: pd.DataFrame, reference: pd.DataFrame) -> Interval:
        nll, tokens = frame["nll"].to_numpy(), frame["tokens"].to_numpy()
        return relative_perplexity(nll, reference["nll"].to_numpy(), tokens)

    def compare(
        self, frame: pd.DataFrame, reference: pd.DataFrame, point: pd.Series
    ) -> tuple[Interval, dict[str, Any]]:
        nll, tokens = frame["nll"].to_numpy(), frame["tokens"].to_numpy()
        reference_nll = reference["nll"].to_numpy()
        delta = self.delta(frame, reference)
        columns = {
            "word_delta": (1 + delta.estimate) ** _tokens_per_word(point) - 1,
            "wilcoxon_p": wilcoxon(nll, reference_nll, tokens),
        }
        return delta, columns

    def recovery(self, float_frame: pd.DataFrame, ptq: pd.DataFrame, qat: pd.DataFrame) -> Interval:
        nll = tuple(frame["nll"].to_numpy() for frame in (float_frame, ptq, qat))
        return recovery(
            (*nll, qat["tokens"].to_numpy()),
            lambda *sums, axis: tuple(np.exp(n.sum(axis=axis) / sums[-1].sum(axis=axis)) for n in sums[:-1]),
        )


# Every statistic a task may declare, by name: the one vocabulary of `task.quality`.
STATISTICS: dict[str, Statistic] = {s.name: s for s in (Accuracy(), Perplexity(), MacroF1())}


@dataclass(frozen=True)
class Margins:
    """Non-inferiority margins, one per statistic under its name, each in its statistic's unit:
    accuracy and F1 points, percent of perplexity."""

    accuracy: float = Accuracy.margin
    ppl: float = Perplexity.margin
    macro_f1: float = MacroF1.margin

    def of(self, statistic: str) -> float:
        return float(getattr(self, statistic))

    def describe(self) -> str:
        """The margins as a table's title states them: "accuracy 1 pt, ppl 2 %, macro_f1 1 pt"."""
        return ", ".join(f"{name} {self.of(name):g} {s.unit}" for name, s in STATISTICS.items())


def _columns(name: str, interval: Interval) -> dict[str, float]:
    return {name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high}


def _correct(frame: pd.DataFrame) -> np.ndarray:
    return (frame["prediction"] == frame["target"]).to_numpy()


def _tokens_per_word(point: pd.Series) -> float:
    return point.get("metrics.test/tokens", np.nan) / point.get("metrics.test/words", np.nan)


def _quality(point: pd.Series, examples: pd.DataFrame) -> str:
    """The statistic the point's task declared (`task.quality`); for a point recorded before tasks
    declared one, the one its examples' shape implies: perplexity for windows with an NLL, else accuracy."""
    declared = point.get("task.quality")
    if not pd.isna(declared):
        return str(declared)
    windows = "nll" in examples and examples["nll"].notna().any()
    return Perplexity.name if windows else Accuracy.name


def _unusable(point: pd.Series, examples: pd.DataFrame | None) -> str | None:
    """Why the point's examples give no figure (none recorded, a statistic this report does not
    compute, columns it lacks), or None."""
    if examples is None:
        return NO_EXAMPLES
    name = _quality(point, examples)
    if name not in STATISTICS:
        return f"no interval: task.quality={name!r} is not a statistic of this report; it computes {list(STATISTICS)}"
    missing = [c for c in STATISTICS[name].columns if c not in examples]
    if missing:
        return (
            f"no interval: task.quality={name!r} reads the columns {missing}, which its {EXAMPLES_FILE} lacks"
        )
    return None


def per_seed(training: pd.DataFrame, margins: Margins) -> pd.DataFrame:
    """One row per (point, tested model): its quality figure by its task's statistic, and for all
    but the reference model its paired delta, CI, paired test, the verdict and whether the delta is
    significant. A point without a usable figure gets one row, its note saying why."""
    examples = {point: read_examples(Path(point)) for point in training["point"]}
    rows = []
    for _, point in training.iterrows():
        own = examples[point["point"]]
        note = _unusable(point, own)
        if note:
            rows.append({**_identity(point), "model": None, "note": note})
            continue
        statistic = STATISTICS[_quality(point, own)]
        reference = _reference_examples(point, training, examples)
        for model, frame in own.groupby("model", sort=False):
            compared = _compared(statistic, frame, reference, model, point, margins)
            rows.append({**_identity(point), "model": model, **compared})
    return pd.DataFrame(rows)


def _identity(point: pd.Series) -> dict[str, Any]:
    return {
        "point": point["point"],
        "quant": point.get("choices.quant"),
        "seed": point.get("params.seed"),
        "seed_group_hash": point.get("seed_group_hash"),
    }


def _reference_examples(
    point: pd.Series, training: pd.DataFrame, examples: dict[str, pd.DataFrame | None]
) -> pd.DataFrame | None:
    """The FP32 model's examples of the point's reference: the FP32 point of the same reference hash."""
    if pd.isna(point.get("reference_hash")) or "reference_hash" not in training:
        return None
    same = training[
        (training["reference_hash"] == point["reference_hash"])
        & (training.get("params.quant_method", pd.Series(None, index=training.index)) == "none")
    ]
    for folder in same["point"]:
        frame = examples[folder]
        if frame is not None and (frame["model"] == REFERENCE_MODEL).any():
            return frame[frame["model"] == REFERENCE_MODEL]
    return None


def _is_reference(model: str, point: pd.Series) -> bool:
    return model == REFERENCE_MODEL and point.get("params.quant_method") == "none"


def _same_examples(statistic: Statistic, frame: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame | None:
    """The reference's rows of `frame`'s examples in `frame`'s order, or None when it was tested on
    others: one missing, or a target or a window's tokens unlike `frame`'s."""
    if any(c not in reference for c in statistic.columns):
        return None
    theirs = reference.set_index("index").reindex(frame["index"])
    if theirs[list(statistic.columns)].isna().any(axis=None):
        return None
    return theirs if np.array_equal(theirs[statistic.same], frame[statistic.same]) else None


def _compared(
    statistic: Statistic,
    frame: pd.DataFrame,
    reference: pd.DataFrame | None,
    model: str,
    point: pd.Series,
    margins: Margins,
) -> dict[str, Any]:
    """One model's figure; against the reference's FP32 model on the same examples, the delta with
    its CI, the paired test and the verdict."""
    row = {**statistic.measure(frame, point), "examples": len(frame)}
    if _is_reference(model, point):
        return row
    if reference is None:
        return {**row, "note": NO_REFERENCE}
    theirs = _same_examples(statistic, frame, reference)
    if theirs is None:
        return {**row, "note": OTHER_WINDOWS}
    delta, test = statistic.compare(frame, theirs, point)
    return {
        **row,
        **_columns("delta", delta),
        **test,
        "verdict": statistic.verdict(delta, margins),
        "significant": delta.significant,
    }


def over_seeds(seeds: pd.DataFrame, margins: Margins) -> pd.DataFrame:
    """Points alike but for the seed, per tested model: n, the t factor, the mean quality figure of
    its statistic ± its t-interval (cut to the statistic's range, `Statistic.within`) and what that
    interval is, mean delta ± its t-interval and the verdict that interval supports."""
    rows = []
    for statistic in STATISTICS.values():
        figure = statistic.name
        measured = seeds.dropna(subset=[figure]) if figure in seeds else seeds.iloc[:0]
        for _, group in measured.groupby(["seed_group_hash", "model"], sort=False, dropna=False):
            rows.append(_over_seeds_row(group, statistic, margins))
    return pd.DataFrame(rows)


def _over_seeds_row(group: pd.DataFrame, statistic: Statistic, margins: Margins) -> dict[str, Any]:
    figure = statistic.name
    spread = t_interval(group[figure].to_numpy(), within=statistic.within)
    row: dict[str, Any] = {
        "quant": group["quant"].iloc[0],
        "model": group["model"].iloc[0],
        "seed_group_hash": group["seed_group_hash"].iloc[0],
        "seeds": spread.n,
        "t": spread.t,
        **_columns(figure, spread.interval),
        f"{figure}_interval": _spread_kind(spread),
    }
    compared = group.dropna(subset=["delta"]) if "delta" in group else group.iloc[:0]
    if len(compared):
        delta, kind = _delta_interval(compared)
        row.update(
            **_columns("delta", delta),
            delta_interval=kind,
            **{statistic.test_p: ", ".join(f"{p:.3g}" for p in compared[statistic.test_p])},
            verdict=statistic.verdict(delta, margins),
            significant=delta.significant,
        )
    return row


def _spread_kind(spread: SeedSpread) -> str:
    """What a figure's interval over seeds is, so that a bound at 0 or 100 % reads as the range's."""
    if spread.n < 2:
        return "none (1 seed)"
    return f"t over {spread.n} seeds" + (", clipped to the possible range" if spread.clipped else "")


def _delta_interval(compared: pd.DataFrame) -> tuple[Interval, str]:
    """Over several seeds, the t-interval of their deltas; for one, its paired bootstrap CI."""
    if len(compared) == 1:
        only = compared.iloc[0]
        return Interval(only["delta"], only["delta_low"], only["delta_high"]), "bootstrap (1 seed)"
    spread = t_interval(compared["delta"].to_numpy())
    return spread.interval, f"t over {spread.n} seeds"
