"""The report's plots: quality (each task's headline figure) vs latency with its Pareto frontier,
attention scaling, INT8 vs FP32 size, and language models' perplexity vs the size they ship at.

Each function takes the flat table and returns a matplotlib Figure, or None when the sweep holds
nothing to plot (a benchmark-only sweep has no accuracy; a training sweep has no sequence scaling).
"""

from __future__ import annotations

import itertools
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

# The model a job ships: its INT8 form where the job made one, else FP32; torch first.
_SHIPPED = [
    (variant, backend)
    for variant in ("int8", "fp32")
    for backend in ("torch", "torch_compile", "onnxruntime")
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def shipped_latency(table: pd.DataFrame, figure: str = "p50_ms") -> pd.Series:
    """A latency `figure` (p50_ms, ratio_to_fp32, ...) of the model each job ships, NaN where it has none.

    The shipped model is chosen by which p50 exists, then every figure is read from that one row,
    so a p50 and a ratio in the same report line always describe the same model.
    """
    out = pd.Series(None, index=table.index, dtype=object)  # numbers, or flags such as host_busy
    chosen = pd.Series(False, index=table.index)
    for variant, backend in _SHIPPED:
        prefix = f"latency.{variant}.{backend}."
        if prefix + "p50_ms" not in table:
            continue
        take = ~chosen & table[prefix + "p50_ms"].notna()
        if prefix + figure in table:
            out[take] = table.loc[take, prefix + figure]
        chosen |= take
    return out.infer_objects()


def pareto_mask(latency: pd.Series, accuracy: pd.Series) -> pd.Series:
    """Points no other point beats on both axes (lower latency and higher `accuracy`: any figure
    where higher is better)."""
    best, keep = float("-inf"), pd.Series(False, index=latency.index)
    for index in sorted(latency.index, key=lambda i: (latency[i], -accuracy[i])):
        if accuracy[index] > best:
            keep[index], best = True, accuracy[index]
    return keep


def pareto_latency(table: pd.DataFrame) -> tuple[pd.Series, str]:
    """The accuracy-vs-latency plot's x values and label: paired ratios to FP32 where every point has one.

    On a shared host a point's absolute p50 carries the load of the minutes it ran in; the ratio of
    its INT8 to the FP32 timed in alternating rounds in the same job does not. A job that ships
    FP32 is its own reference (1). Without a quantized point, or with a point lacking a ratio (older
    results), the axis is p50 in ms.
    """
    p50 = shipped_latency(table)
    ratio = shipped_latency(table, "ratio_to_fp32")
    int8_p50 = [c for c in table if c.startswith("latency.int8.") and c.endswith(".p50_ms")]
    quantized = table[int8_p50].notna().any(axis=1) if int8_p50 else pd.Series(False, index=table.index)
    paired = ratio.mask(~quantized & ratio.isna(), 1.0)
    timed = p50.notna()
    if quantized[timed].any() and paired[timed].notna().all():
        return paired, "latency / FP32 latency (paired within each job; INT8 where quantized)"
    return p50, "latency p50 (ms, INT8 where quantized)"


def varying_coordinates(points: pd.DataFrame) -> list[str]:
    """The sweep coordinates (`choices.*` and `params.*` columns, but the raw override list) whose
    value differs between the points: what a plot must tell apart."""
    derived = ("params.overrides", "params.quant_method")  # the raw overrides; implied by choices.quant
    columns = [c for c in points if c.startswith(("choices.", "params.")) and c not in derived]
    return [c for c in columns if points[c].astype(str).nunique() > 1]


def quality_vs_latency(table: pd.DataFrame) -> Figure | None:
    """Each job's headline figure (test accuracy for classification) against its shipped model's
    latency, with the Pareto frontier ringed. Vertical bars: the figure's 95 % bootstrap interval
    over the test examples; horizontal bars: the paired latency ratio's p10-p90 over rounds. Colour
    is the quantization recipe, and each other coordinate that varies is in the point's label, with
    a marker per combination of them."""
    if "headline_value" not in table:
        return None
    points = table[table["status"] == "ok"]
    latency, xlabel = pareto_latency(points)
    paired = "paired" in xlabel
    spread = {q: shipped_latency(points, f"ratio_{q}_to_fp32") for q in ("p10", "p90")}
    points = points.assign(latency=latency, x_low=spread["p10"], x_high=spread["p90"])
    points = points.dropna(subset=["headline_value", "latency"])
    if points.empty:
        return None
    varying = [c for c in varying_coordinates(points) if c != "choices.quant"]
    labels = (
        points[varying].fillna("-").astype(str).agg(", ".join, axis=1)
        if varying
        else pd.Series("", index=points.index)
    )
    fig, ax = plt.subplots(figsize=(8, 5))
    _draw_points(ax, points, labels, paired)
    better = points["headline_value"].where(points["higher_is_better"], -points["headline_value"])
    front = points[pareto_mask(points["latency"], better)].sort_values("latency")
    ax.step(front["latency"], front["headline_value"], where="post", color="black", lw=1, ls="--")
    ax.scatter(
        front["latency"],
        front["headline_value"],
        s=180,
        facecolors="none",
        edgecolors="black",
        label="Pareto frontier",
    )
    metric = " / ".join(sorted(points["headline"].astype(str).unique()))
    legend_title = ", ".join(c.split(".", 1)[1] for c in varying) or None
    ax.set(xlabel=xlabel, ylabel=metric, title=f"{metric} vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", title=f"quant ({legend_title})" if legend_title else "quant")
    fig.tight_layout()
    return fig


def _draw_points(ax: Any, points: pd.DataFrame, labels: pd.Series, paired: bool) -> None:
    """One error-bar series per (quant, other varying coordinates): colour by quant, marker by the rest."""
    colours = dict(
        zip(sorted(points["choices.quant"].astype(str).unique()), itertools.cycle(plt.cm.tab10.colors))
    )
    markers = dict(zip(sorted(labels.unique()), itertools.cycle(_MARKERS)))
    for (quant, label), group in points.groupby([points["choices.quant"].astype(str), labels]):
        ax.errorbar(
            group["latency"],
            group["headline_value"],
            xerr=_bars(group["latency"], group["x_low"], group["x_high"]) if paired else None,
            yerr=_bars(group["headline_value"], group.get("headline_low"), group.get("headline_high")),
            color=colours[quant],
            marker=markers[label],
            markersize=7,
            linestyle="none",
            capsize=3,
            label=f"{quant}" + (f" ({label})" if label else ""),
        )


def _bars(centre: pd.Series, low: pd.Series | None, high: pd.Series | None) -> list[list[float]] | None:
    """Error bar lengths below and above each centre; None (no bar) where bounds are missing."""
    if low is None or high is None or low.isna().all():
        return None
    return [(centre - low).fillna(0).clip(lower=0).tolist(), (high - centre).fillna(0).clip(lower=0).tolist()]


def attention_scaling(table: pd.DataFrame) -> Figure | None:
    if "bench.seq_len" not in table:
        return None
    points = table[(table["status"] == "ok") & (table.get("bench.status") == "ok")]
    if points.empty:
        return None
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (attention, backend, device, dtype, batch), group in points.groupby(
        ["attention_kernel", "bench.backend", "bench.device", "bench.dtype", "bench.batch_size"]
    ):
        group = group.sort_values("bench.seq_len")
        label = f"{attention} ({backend}, {device} {dtype}, batch {int(batch)})"
        lat.plot(group["bench.seq_len"], group["bench.p50_ms"], marker="o", label=label)
        mem.plot(group["bench.seq_len"], group["peak_mib"], marker="o", label=label)
    lengths = sorted(int(n) for n in points["bench.seq_len"].unique())
    for ax, ylabel in ((lat, "latency p50 (ms)"), (mem, "peak memory of one forward (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel="sequence length (tokens)", ylabel=ylabel)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Attention scaling")
    fig.tight_layout()
    return fig


def model_sizes(table: pd.DataFrame) -> Figure | None:
    if "model.int8_bytes" not in table:
        return None
    points = table[(table["status"] == "ok")].dropna(subset=["model.int8_bytes"])
    if points.empty:
        return None
    labels = points["choices.quant"].astype(str) + " / " + points["choices.attention"].astype(str)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(points) + 1.5))
    y = range(len(points))
    ax.barh([i + 0.2 for i in y], points["model.fp32_bytes"] / 1e6, height=0.4, label="FP32")
    ax.barh([i - 0.2 for i in y], points["model.int8_bytes"] / 1e6, height=0.4, label="INT8 artifact")
    ax.set_yticks(list(y), labels)
    ax.set(xlabel="size on disk (MB)", title="INT8 vs FP32 model size")
    ax.legend()
    fig.tight_layout()
    return fig


def perplexity_vs_size(table: pd.DataFrame) -> Figure | None:
    """Language-modelling jobs: test perplexity (95 % bootstrap interval over windows) against the
    size of the model each ships (its INT8 artifact, or FP32's state_dict), one colour per recipe."""
    if "headline" not in table or "model.fp32_bytes" not in table:
        return None
    points = table[(table["status"] == "ok") & (table["headline"] == "test/ppl")]
    if points.empty:
        return None
    int8 = (
        points["model.int8_bytes"]
        if "model.int8_bytes" in points
        else pd.Series(float("nan"), index=points.index)
    )
    points = points.assign(size_mb=int8.fillna(points["model.fp32_bytes"]) / 1e6)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = itertools.cycle(plt.cm.tab10.colors)
    for quant, group in points.groupby(points["choices.quant"].astype(str)):
        ax.errorbar(
            group["size_mb"],
            group["headline_value"],
            yerr=_bars(group["headline_value"], group.get("headline_low"), group.get("headline_high")),
            color=next(colours),
            marker="o",
            linestyle="none",
            capsize=3,
            label=quant,
        )
    ax.set(xlabel="shipped model size (MB)", ylabel="test perplexity (per token)", title="Perplexity vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


FIGURES = {
    "pareto": quality_vs_latency,
    "scaling": attention_scaling,
    "sizes": model_sizes,
    "ppl_vs_size": perplexity_vs_size,
}
