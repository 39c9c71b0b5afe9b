"""Quality with its uncertainty: every tested model of every training point against its FP32 reference.

A quantized point's reference is the FP32 point of the same sweep whose config is equal but for
`quant` and `benchmark` (results.json's `reference_hash`): the same seed, data and test set. An
FP32 point is its own reference, for the other models it tested (ONNX Runtime's). From both
points' `examples.parquet` each model gets its accuracy, the paired delta to the reference's FP32
model with a bootstrap CI, McNemar's test and a verdict (`qatflash.report.stats`). Points that
differ only in `seed` (`seed_group_hash`) are then summarised as mean ± t-interval over the seeds,
and the verdict of a group reads the t-interval of its deltas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from qatflash.report.stats import Interval, accuracy, mcnemar, paired_delta, t_interval, verdict
from qatflash.results import EXAMPLES_FILE, read_examples

REFERENCE_MODEL = "fp32"
NO_EXAMPLES = f"no interval: the point has no {EXAMPLES_FILE} (recorded before per-example results)"
NO_REFERENCE = "no interval: no FP32 point of the same config but quant and benchmark"


def per_seed(training: pd.DataFrame, margin: float) -> pd.DataFrame:
    """One row per (point, tested model): accuracy, and for all but the reference model its paired
    delta, CI, McNemar b, c and p, the verdict and whether the delta is significant."""
    examples = {point: read_examples(Path(point)) for point in training["point"]}
    rows = []
    for _, point in training.iterrows():
        own = examples[point["point"]]
        if own is None:
            rows.append({**_identity(point), "model": None, "note": NO_EXAMPLES})
            continue
        reference = _reference_examples(point, training, examples)
        for model, frame in own.groupby("model", sort=False):
            rows.append(
                {**_identity(point), "model": model, **_compared(frame, reference, model, point, margin)}
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


def _compared(
    frame: pd.DataFrame, reference: pd.DataFrame | None, model: str, point: pd.Series, margin: float
) -> dict[str, Any]:
    correct = _correct(frame)
    measured = accuracy(correct.to_numpy())
    row: dict[str, Any] = {
        "accuracy": measured.estimate,
        "accuracy_low": measured.low,
        "accuracy_high": measured.high,
        "examples": len(correct),
    }
    is_reference = model == REFERENCE_MODEL and point.get("params.quant_method") == "none"
    if is_reference:
        return row
    if reference is None:
        return {**row, "note": NO_REFERENCE}
    reference_correct = _correct(reference).reindex(correct.index)
    if reference_correct.isna().any():
        return {**row, "note": "no interval: the reference was tested on other examples"}
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
        "verdict": verdict(delta, margin),
        "significant": delta.significant,
    }


def over_seeds(seeds: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Points alike but for the seed, per tested model: n, the t factor, mean accuracy ± its
    t-interval, mean delta ± its t-interval and the verdict that interval supports."""
    measured = seeds.dropna(subset=["accuracy"]) if "accuracy" in seeds else seeds.iloc[:0]
    rows = []
    for (_, model), group in measured.groupby(["seed_group_hash", "model"], sort=False, dropna=False):
        accuracy = t_interval(group["accuracy"].to_numpy())
        row: dict[str, Any] = {
            "quant": group["quant"].iloc[0],
            "model": model,
            "seeds": accuracy.n,
            "t": accuracy.t,
            "accuracy": accuracy.interval.estimate,
            "accuracy_low": accuracy.interval.low,
            "accuracy_high": accuracy.interval.high,
        }
        compared = group.dropna(subset=["delta"]) if "delta" in group else group.iloc[:0]
        if len(compared):
            delta, kind = _delta_interval(compared)
            row.update(
                delta=delta.estimate,
                delta_low=delta.low,
                delta_high=delta.high,
                delta_interval=kind,
                mcnemar_p=", ".join(f"{p:.3g}" for p in compared["mcnemar_p"]),
                verdict=verdict(delta, margin),
                significant=delta.significant,
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _delta_interval(compared: pd.DataFrame) -> tuple[Interval, str]:
    """Over several seeds, the t-interval of their deltas; for one, its paired bootstrap CI."""
    if len(compared) == 1:
        only = compared.iloc[0]
        return Interval(only["delta"], only["delta_low"], only["delta_high"]), "bootstrap (1 seed)"
    spread = t_interval(compared["delta"].to_numpy())
    return spread.interval, f"t over {spread.n} seeds"
