"""Quality with its uncertainty: every tested model of every training point against its FP32 reference.

A quantized point's reference is the FP32 point of the same sweep whose config is equal but for
`quant` and `benchmark` (results.json's `reference_hash`): the same seed, data and test set. An
FP32 point is its own reference, for the other models it tested (ONNX Runtime's). From both
points' `examples.parquet` each model gets its quality figure with a bootstrap CI, the paired delta
to the reference's FP32 model with its CI, a paired test and a verdict (`qatflash.report.stats`):

- classification (examples with a `prediction`): accuracy, its delta in points, McNemar's test;
- language modelling (examples with a window `nll`): perplexity per token and per word, its
  relative change in percent, the Wilcoxon signed-rank test over windows.

Points that differ only in `seed` (`seed_group_hash`) are then summarised as mean ± t-interval over
the seeds (an accuracy's cut to [0, 1]), and the verdict of a group reads the t-interval of its
deltas. Each figure has its own non-inferiority margin, in its own unit (`Margins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qatflash.report.stats import (
    Interval,
    SeedSpread,
    accuracy,
    mcnemar,
    paired_delta,
    perplexity,
    relative_perplexity,
    t_interval,
    verdict,
    wilcoxon,
)
from qatflash.results import EXAMPLES_FILE, read_examples

REFERENCE_MODEL = "float"
OTHER_WINDOWS = "no interval: the reference was tested on other examples"
# The range each figure cannot leave, to which its t-interval over seeds is cut (perplexity has
# none that seeds come near).
RANGES = {"accuracy": (0.0, 1.0)}


@dataclass(frozen=True)
class Margins:
    """Non-inferiority margins: accuracy points, and percent of perplexity."""

    accuracy: float = 1.0
    ppl: float = 2.0

    def of(self, figure: str) -> float:
        return self.accuracy if figure == "accuracy" else self.ppl


def _figure(frame: pd.DataFrame) -> str:
    """The quality figure of these rows: `ppl` for language models' windows, else `accuracy`."""
    return "ppl" if "nll" in frame and frame["nll"].notna().any() else "accuracy"


NO_EXAMPLES = f"no interval: the point has no {EXAMPLES_FILE} (recorded before per-example results)"
NO_REFERENCE = "no interval: no FP32 point of the same config but quant and benchmark"


def per_seed(training: pd.DataFrame, margins: Margins) -> pd.DataFrame:
    """One row per (point, tested model): its quality figure, and for all but the reference model
    its paired delta, CI, paired test, the verdict and whether the delta is significant."""
    examples = {point: read_examples(Path(point)) for point in training["point"]}
    rows = []
    for _, point in training.iterrows():
        own = examples[point["point"]]
        if own is None:
            rows.append({**_identity(point), "model": None, "note": NO_EXAMPLES})
            continue
        reference = _reference_examples(point, training, examples)
        compare = _compared_perplexity if _figure(own) == "ppl" else _compared
        for model, frame in own.groupby("model", sort=False):
            rows.append(
                {**_identity(point), "model": model, **compare(frame, reference, model, point, margins)}
            )
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


def _correct(frame: pd.DataFrame) -> pd.Series:
    return (frame["prediction"] == frame["target"]).set_axis(frame["index"])


def _is_reference(model: str, point: pd.Series) -> bool:
    return model == REFERENCE_MODEL and point.get("params.quant_method") == "none"


def _compared(
    frame: pd.DataFrame, reference: pd.DataFrame | None, model: str, point: pd.Series, margins: Margins
) -> dict[str, Any]:
    correct = _correct(frame)
    measured = accuracy(correct.to_numpy())
    row: dict[str, Any] = {
        "accuracy": measured.estimate,
        "accuracy_low": measured.low,
        "accuracy_high": measured.high,
        "examples": len(correct),
    }
    if _is_reference(model, point):
        return row
    if reference is None:
        return {**row, "note": NO_REFERENCE}
    reference_correct = _correct(reference).reindex(correct.index)
    if reference_correct.isna().any():
        return {**row, "note": OTHER_WINDOWS}
    delta = paired_delta(correct.to_numpy(), reference_correct.to_numpy(dtype=bool))
    test = mcnemar(correct.to_numpy(), reference_correct.to_numpy(dtype=bool))
    return {
        **row,
        "delta": delta.estimate,
        "delta_low": delta.low,
        "delta_high": delta.high,
        "mcnemar_b": test.b,
        "mcnemar_c": test.c,
        "mcnemar_p": test.p,
        "note": test.note,
        "verdict": verdict(delta, margins.accuracy),
        "significant": delta.significant,
    }


def _compared_perplexity(
    frame: pd.DataFrame, reference: pd.DataFrame | None, model: str, point: pd.Series, margins: Margins
) -> dict[str, Any]:
    """Perplexity per token and per word with CIs over the windows; against the reference's FP32
    model on the same windows, the relative change of perplexity, its CI, the Wilcoxon p and the
    verdict (lower is better). Per word, perplexity is the per-token one to the power tokens/words
    of the split (the same total NLL over the words), so its interval is the same transform."""
    measured = perplexity(frame["nll"].to_numpy(), frame["tokens"].to_numpy())
    per_word = point.get("metrics.test/tokens", np.nan) / point.get("metrics.test/words", np.nan)
    row: dict[str, Any] = {
        "ppl": measured.estimate,
        "ppl_low": measured.low,
        "ppl_high": measured.high,
        "word_ppl": measured.estimate**per_word,
        "word_ppl_low": measured.low**per_word,
        "word_ppl_high": measured.high**per_word,
        "examples": len(frame),
        "tokens": int(frame["tokens"].sum()),
    }
    if _is_reference(model, point):
        return row
    if reference is None:
        return {**row, "note": NO_REFERENCE}
    windows = reference.set_index("index").reindex(frame["index"])
    if windows["nll"].isna().any() or not np.array_equal(windows["tokens"], frame["tokens"]):
        return {**row, "note": OTHER_WINDOWS}
    nll, reference_nll, tokens = (
        frame["nll"].to_numpy(),
        windows["nll"].to_numpy(),
        frame["tokens"].to_numpy(),
    )
    delta = relative_perplexity(nll, reference_nll, tokens)
    return {
        **row,
        "delta": delta.estimate,
        "delta_low": delta.low,
        "delta_high": delta.high,
        "word_delta": (1 + delta.estimate) ** per_word - 1,
        "wilcoxon_p": wilcoxon(nll, reference_nll, tokens),
        "verdict": verdict(delta, margins.ppl, higher_is_better=False),
        "significant": delta.significant,
    }


def over_seeds(seeds: pd.DataFrame, margins: Margins) -> pd.DataFrame:
    """Points alike but for the seed, per tested model: n, the t factor, the mean quality figure
    (accuracy or perplexity) ± its t-interval (cut to the figure's range, `RANGES`) and what that
    interval is, mean delta ± its t-interval and the verdict that interval supports."""
    rows = []
    for figure in ("accuracy", "ppl"):
        measured = seeds.dropna(subset=[figure]) if figure in seeds else seeds.iloc[:0]
        for _, group in measured.groupby(["seed_group_hash", "model"], sort=False, dropna=False):
            rows.append(_over_seeds_row(group, figure, margins))
    return pd.DataFrame(rows)


def _over_seeds_row(group: pd.DataFrame, figure: str, margins: Margins) -> dict[str, Any]:
    spread = t_interval(group[figure].to_numpy(), within=RANGES.get(figure))
    row: dict[str, Any] = {
        "quant": group["quant"].iloc[0],
        "model": group["model"].iloc[0],
        "seed_group_hash": group["seed_group_hash"].iloc[0],
        "seeds": spread.n,
        "t": spread.t,
        figure: spread.interval.estimate,
        f"{figure}_low": spread.interval.low,
        f"{figure}_high": spread.interval.high,
        f"{figure}_interval": _spread_kind(spread),
    }
    compared = group.dropna(subset=["delta"]) if "delta" in group else group.iloc[:0]
    if len(compared):
        delta, kind = _delta_interval(compared)
        test = "mcnemar_p" if figure == "accuracy" else "wilcoxon_p"
        row.update(
            delta=delta.estimate,
            delta_low=delta.low,
            delta_high=delta.high,
            delta_interval=kind,
            **{test: ", ".join(f"{p:.3g}" for p in compared[test])},
            verdict=verdict(delta, margins.of(figure), higher_is_better=figure == "accuracy"),
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
