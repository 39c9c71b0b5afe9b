"""What QAT buys over PTQ: the share of PTQ's loss that a QAT of the same scheme recovers.

recovery = (PTQ − QAT) / (PTQ − float) of the task's quality figure (accuracy, perplexity,
macro-F1: `Statistic.recovery`), the way QAT papers report it (torchao's int8-activation,
int4-weight QAT of Llama-3-8B recovered 68 % of PTQ's WikiText perplexity loss). 1: QAT scores what
float does; 0: what PTQ does; below 0: worse than PTQ.

Only like for like: a QAT point pairs with the PTQ point of the same reference hash (the same
model, data, trainer and seed: everything but `quant` and `benchmark`) whose product has the same
scheme key (`model.scheme`: `Recipe.scheme`, what decides its numbers, not how its scales were
found), and both are read against that reference's float model on the same test examples.

Per seed, its paired bootstrap CI over the examples (windows for a language model). Where PTQ's own
change to float has an interval containing 0 there is no loss to recover, and no recovery is
given; where that interval's bound nearest 0 is within `NEAR_ZERO` of its estimate, the
denominator could be a fraction of what was measured, and the row says so. Over seeds, the mean of
the seeds' recoveries with its t-interval, and so for QAT's paired change against PTQ (given for
every paired seed, also where there is no recovery to measure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qatflash.report.quality import (
    STATISTICS,
    _columns,
    _quality,
    _reference_examples,
    _same_examples,
)
from qatflash.report.quality import (
    _identity as _point_identity,
)
from qatflash.report.stats import Interval, t_interval
from qatflash.results import QUANTIZED, read_examples

# A PTQ change whose interval comes this close to 0, as a share of its estimate, makes an unstable ratio.
NEAR_ZERO = 0.5
NO_PTQ = "no PTQ point of the same scheme (model.scheme) and reference"
NOT_SHIPPED = "no quantized model: not shipped, or no examples"


def recovery_per_seed(training: pd.DataFrame, seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per QAT point and each PTQ point it pairs with (or one saying there is none): both
    changes to float with their CIs (from `seeds`: `qatflash.report.quality.per_seed`), and the
    recovery with its CI or why there is none."""
    if "model.scheme" not in training or "params.quant_method" not in training:
        return pd.DataFrame()
    qat_points = training[(training["params.quant_method"] == "qat") & training["model.scheme"].notna()]
    ptq_points = training[training["params.quant_method"].astype(str).str.startswith("ptq")]
    deltas = seeds[seeds["model"] == QUANTIZED].set_index("point") if not seeds.empty else pd.DataFrame()
    examples = {point: read_examples(Path(point)) for point in training["point"]}
    rows = []
    for _, qat in qat_points.iterrows():
        same = ptq_points[
            (ptq_points["reference_hash"] == qat["reference_hash"])
            & (ptq_points["model.scheme"] == qat["model.scheme"])
        ]
        if same.empty:
            rows.append({**_identity(qat), "note": NO_PTQ})
        rows += [_paired(qat, ptq, training, deltas, examples) for _, ptq in same.iterrows()]
    return pd.DataFrame(rows)


def _identity(qat: pd.Series) -> dict[str, Any]:
    return {**_point_identity(qat), "scheme": qat["model.scheme"]}


def _paired(
    qat: pd.Series,
    ptq: pd.Series,
    training: pd.DataFrame,
    deltas: pd.DataFrame,
    examples: dict[str, pd.DataFrame | None],
) -> dict[str, Any]:
    """The QAT point's recovery over the PTQ point `ptq` (of its scheme and reference)."""
    row = {
        **_identity(qat),
        "ptq_quant": ptq.get("choices.quant"),
        "ptq_seed_group_hash": ptq.get("seed_group_hash"),
    }
    if qat["point"] not in deltas.index or ptq["point"] not in deltas.index:
        return {**row, "note": NOT_SHIPPED}
    for name, point in (("ptq", ptq), ("qat", qat)):
        found = deltas.loc[point["point"]]
        row.update(
            _columns(f"{name}_delta", Interval(found["delta"], found["delta_low"], found["delta_high"]))
        )
    ptq_delta = Interval(row["ptq_delta"], row["ptq_delta_low"], row["ptq_delta_high"])
    frames = _aligned(qat, ptq, training, examples)
    if frames is not None:  # QAT against PTQ itself, paired over the same examples
        statistic, float_frame, ptq_frame, qat_frame = frames
        row.update(
            statistic=statistic.name,
            **_columns("qat_vs_ptq", statistic.compare(qat_frame, ptq_frame, qat)[0]),
        )
    if not ptq_delta.significant:
        return {
            **row,
            "note": f"no recovery to measure: PTQ's change [{ptq_delta.low:.4g}, {ptq_delta.high:.4g}] contains 0",
        }
    if frames is None:
        return {**row, "note": "no interval: the three models were tested on other examples"}
    row.update(_columns("recovery", statistic.recovery(float_frame, ptq_frame, qat_frame)))
    nearest = min(abs(ptq_delta.low), abs(ptq_delta.high))
    if nearest < NEAR_ZERO * abs(ptq_delta.estimate):
        row["note"] = (
            f"unstable: PTQ's change [{ptq_delta.low:.4g}, {ptq_delta.high:.4g}] comes within "
            f"{NEAR_ZERO:.0%} of its size of 0, so the ratio's denominator is uncertain"
        )
    return row


def _aligned(
    qat: pd.Series, ptq: pd.Series, training: pd.DataFrame, examples: dict[str, pd.DataFrame | None]
) -> tuple[Any, ...] | None:
    """The QAT point's statistic and the float, PTQ and QAT models' rows of the same examples, in
    the QAT point's order (None where any was tested on other examples)."""
    own, theirs = examples[qat["point"]], examples[ptq["point"]]
    reference = _reference_examples(qat, training, examples)
    if own is None or theirs is None or reference is None:
        return None
    statistic = STATISTICS[_quality(qat, own)]
    qat_frame = own[own["model"] == QUANTIZED].reset_index(drop=True)
    float_frame = _same_examples(statistic, qat_frame, reference)
    ptq_frame = _same_examples(statistic, qat_frame, theirs[theirs["model"] == QUANTIZED])
    if float_frame is None or ptq_frame is None:
        return None
    return statistic, float_frame, ptq_frame, qat_frame


def recovery_over_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per QAT configuration and PTQ configuration (each's points over seeds) it pairs with: the
    seeds' mean recovery and mean paired change against PTQ, each with its t-interval (one seed: its
    bootstrap CI), and how many seeds had no recovery to measure (their change against PTQ counts)."""
    if per_seed.empty or "recovery" not in per_seed:
        return pd.DataFrame()
    rows = []
    keys = ["seed_group_hash", "quant", "ptq_seed_group_hash", "ptq_quant"]
    wanted = [*keys, "qat_vs_ptq"]
    present = per_seed.reindex(columns=[*per_seed.columns, *(k for k in wanted if k not in per_seed)])
    for (group, quant, ptq_group, ptq_quant), seeds in present.groupby(keys, sort=False, dropna=False):
        measured = seeds.dropna(subset=["recovery"])
        rows.append(
            {
                "quant": quant,
                "ptq_quant": ptq_quant,
                "seed_group_hash": group,
                "ptq_seed_group_hash": ptq_group,
                "seeds": len(measured),
                "seeds_without": len(seeds) - len(measured),
                **_over_seeds("recovery", measured),
                **_over_seeds("qat_vs_ptq", seeds.dropna(subset=["qat_vs_ptq"])),
            }
        )
    return pd.DataFrame(rows)


def _over_seeds(name: str, seeds: pd.DataFrame) -> dict[str, Any]:
    """`name`'s mean over the seeds with its t-interval; one seed's own bootstrap CI; NaN for none."""
    if len(seeds) == 1:
        only = seeds.iloc[0]
        interval = Interval(only[name], only[f"{name}_low"], only[f"{name}_high"])
        return {**_columns(name, interval), f"{name}_interval": "bootstrap (1 seed)"}
    if len(seeds) > 1:
        spread = t_interval(seeds[name].to_numpy())
        return {**_columns(name, spread.interval), f"{name}_interval": f"t over {spread.n} seeds"}
    return {name: np.nan}
