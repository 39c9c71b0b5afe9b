"""The sensitivity analyses a sweep's float points ran (`qatflash.sensitivity`): every group's
measured change with its interval and the proxy beside it, the front each search found with the
uniform recipes' predictions on it, and the mixes each budget chose, per sequence length, so that a
reader sees whether the groups worth keeping float change with the length.

Read from each point's files (SENSITIVITY_FILE, FRONT_FILE and results.json's `sensitivity`
section); the mixes' own test-split figures are ordinary points of the sweep that ran them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from qatflash.results import read_results

_POINT = ["point", "params.max_length", "params.seed"]


def _points(table: pd.DataFrame) -> pd.DataFrame:
    """The finished points that measured a sensitivity table."""
    if "sensitivity.file" not in table:
        return pd.DataFrame()
    done = table[(table["status"] == "ok") & table["sensitivity.file"].notna()]
    return done.drop_duplicates("point")


def sensitivity_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every (point, precision, group) row, with the point's length and seed and the statistic's unit."""
    frames = [
        pd.read_csv(Path(row["point"]) / row["sensitivity.file"]).assign(
            **{key: row[key] for key in _POINT}, unit=row["sensitivity.unit"]
        )
        for _, row in _points(table).iterrows()
    ]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    return frame[[*_POINT, *(c for c in frame.columns if c not in _POINT)]]


def mixes_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per point and budget: the mix it chose (its quant name, bytes, predicted loss) and the groups
    it keeps float, which is what to compare across lengths."""
    rows = []
    for _, row in _points(table).iterrows():
        folder = Path(row["point"])
        section = (read_results(folder) or {})["sensitivity"]
        for mix in section["mixes"]:
            rows.append(
                {
                    **{key: row[key] for key in _POINT},
                    "budget": mix["budget"],
                    "value": mix["value"],
                    "quant": mix["quant"],
                    "bytes": mix.get("bytes"),
                    "predicted_harm": mix.get("harm"),
                    "unit": section["unit"],
                    "kept_float": ", ".join(mix.get("kept_float", [])) or None,
                }
            )
    return pd.DataFrame(rows)


def sensitivity_chart(table: pd.DataFrame) -> Figure | None:
    """Per point (length, seed) and precision: the groups ordered by measured change, each with its
    95 % interval, and the KL proxy beside it on a log axis."""
    rows = sensitivity_table(table)
    if rows.empty:
        return None
    panels = list(rows.groupby([*_POINT, "precision"], sort=False))
    groups = rows["group"].nunique()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.25 * groups + 2), squeeze=False)
    for ax, ((_, length, seed, precision), panel) in zip(axes[0], panels, strict=True):
        panel = panel.sort_values("harm")
        y = range(len(panel))
        errors = [panel["harm"] - panel["harm_low"], panel["harm_high"] - panel["harm"]]
        ax.errorbar(panel["harm"], y, xerr=errors, fmt="o", capsize=2, label="measured change")
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(list(y), panel["group"], fontsize=7)
        ax.set(
            xlabel=f"quality lost ({panel['unit'].iloc[0]}; 95 % CI)",
            title=f"{precision}, L={length}, seed {seed}",
        )
        proxy = ax.twiny()
        proxy.plot(panel["kl"], y, "x", color="tab:red", label="KL proxy")
        proxy.set_xscale("log")
        proxy.set_xlabel("KL(float ‖ quantized) per output", color="tab:red")
    fig.suptitle("Sensitivity: each group quantized alone, on the validation split")
    fig.tight_layout()
    return fig


def front_chart(table: pd.DataFrame) -> Figure | None:
    """Per point: the searched front (bytes of the quantizable weights against the summed validation
    loss), the mixes each budget chose on it, and each uniform recipe's prediction (every group in
    one precision) beside them."""
    points = _points(table)
    if points.empty:
        return None
    rows = sensitivity_table(table)
    mixes = mixes_table(table)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, point in points.iterrows():
        label = f"L={point['params.max_length']}, seed {point['params.seed']}"
        folder = Path(point["point"])
        front = pd.read_csv(folder / point["sensitivity.front_file"])
        (line,) = ax.step(front["bytes"] / 1e6, front["harm"], where="post", label=f"front, {label}")
        chosen = mixes[(mixes["point"] == point["point"]) & mixes["bytes"].notna()]
        ax.plot(chosen["bytes"] / 1e6, chosen["predicted_harm"], "o", color=line.get_color())
        for _, mix in chosen.iterrows():
            ax.annotate(f"{mix['value']:g}", (mix["bytes"] / 1e6, mix["predicted_harm"]), fontsize=7)
        mine = rows[rows["point"] == point["point"]]
        for precision, measured in mine.groupby("precision"):
            ax.plot(
                measured["bytes"].sum() / 1e6,
                measured["harm"].clip(lower=0).sum(),
                "s",
                color=line.get_color(),
                mfc="none",
                label=f"uniform {precision} (predicted), {label}",
            )
    unit = points["sensitivity.unit"].iloc[0]
    ax.set(
        xlabel="quantizable weights (MB)",
        ylabel=f"predicted quality lost ({unit}, validation)",
        title="Mixed-precision front; dots: the budgets' mixes",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
