"""The report's plots: quality (each task's headline figure) vs latency with its Pareto frontier
(decode and prefill for generation), attention scaling, generation scaling (prefill, decode
tokens/s and memory with the KV cache against context), quantized vs float size, and language models'
perplexity vs the size they ship at.

Each function takes the flat table and returns a matplotlib Figure, or None when the sweep holds
nothing to plot (a benchmark-only sweep has no accuracy; a training sweep has no sequence scaling).
"""

from __future__ import annotations

import itertools
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from qatflash.report.sensitivity import front_chart, sensitivity_chart
from qatflash.results import FLOAT, QUANTIZED

# The model a job ships: its quantized form where the job made one, else float; torch first.
_SHIPPED = [
    (variant, backend)
    for variant in (QUANTIZED, FLOAT)
    for backend in ("torch", "torch_compile", "onnxruntime")
]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
SEED_ALPHA = 0.3  # single seeds, drawn faint behind their mean
# Not in a point's label: the quant is its colour (or leads the label), and seeds are one point.
_NOT_IN_LABEL = ("choices.quant", "params.seed")


def shipped_latency(table: pd.DataFrame, figure: str = "p50_ms") -> pd.Series:
    """A latency `figure` (p50_ms, ratio_to_float, ...) of the model each job ships, NaN where it has none.

    The shipped model is chosen by which p50 exists, then every figure is read from that one row,
    so a p50 and a ratio in the same report line always describe the same model. A job whose
    quantized model was not shipped (`model.not_shipped`) has none: its float row is not it.
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
    if "model.not_shipped" in table:
        out[table["model.not_shipped"].notna()] = None
    return out.infer_objects()


def pareto_mask(latency: pd.Series, accuracy: pd.Series) -> pd.Series:
    """Points no other point beats on both axes (lower latency and higher `accuracy`: any figure
    where higher is better)."""
    best, keep = float("-inf"), pd.Series(False, index=latency.index)
    for index in sorted(latency.index, key=lambda i: (latency[i], -accuracy[i])):
        if accuracy[index] > best:
            keep[index], best = True, accuracy[index]
    return keep


def pareto_latency(table: pd.DataFrame, phase: str = "") -> tuple[pd.Series, str]:
    """The quality-vs-latency plot's x values and label: paired ratios to float where every point has one.

    On a shared host a point's absolute p50 carries the load of the minutes it ran in; the ratio of
    its quantized model to the float one timed in alternating rounds in the same job does not. A
    job that ships float is its own reference (1). Without a quantized point, or with a point lacking a ratio (older
    results), the axis is p50 in ms. `phase`: "" for a row's own figures (a forward, or a
    generation's decode per token), "prefill_" for a generation's prefill.
    """
    p50 = shipped_latency(table, f"{phase}p50_ms")
    ratio = shipped_latency(table, f"{phase}ratio_to_float")
    own_p50 = [c for c in table if c.startswith(f"latency.{QUANTIZED}.") and c.endswith(".p50_ms")]
    quantized = table[own_p50].notna().any(axis=1) if own_p50 else pd.Series(False, index=table.index)
    paired = ratio.mask(~quantized & ratio.isna(), 1.0)
    timed = p50.notna()
    what = _timed_what(table, phase)
    if timed.any() and quantized[timed].any() and paired[timed].notna().all():
        return paired, f"{what} / float's (paired within each job; quantized where quantized)"
    return p50, f"{what} p50 (ms, quantized where quantized)"


def _timed_what(table: pd.DataFrame, phase: str) -> str:
    """What a latency figure times: a forward, a generation's decode (per token) or its prefill."""
    if phase == "prefill_":
        return "prefill latency"
    generating = (shipped_latency(table, "scenario") == "generate").any()
    return "decode latency per token" if generating else "latency"


def varying_coordinates(points: pd.DataFrame) -> list[str]:
    """The sweep coordinates (`choices.*` and `params.*` columns, but the raw override list) whose
    value differs between the points: what a plot must tell apart."""
    derived = ("params.overrides", "params.quant_method")  # the raw overrides; implied by choices.quant
    columns = [c for c in points if c.startswith(("choices.", "params.")) and c not in derived]
    return [c for c in columns if points[c].astype(str).nunique() > 1]


def quality_vs_latency(table: pd.DataFrame) -> Figure | None:
    """Each point's headline figure (test accuracy, or perplexity) against its shipped model's
    latency, with the Pareto frontier ringed; for generation, decode per token, and prefill in a
    second panel. A point run with several seeds is one marker, the seeds' mean, because a reader
    compares recipes, not seeds; its seeds are drawn faint behind it. Vertical bars: for several
    seeds the t-interval over them (quality.csv's), for one the 95 % bootstrap interval over the
    test examples; horizontal bars: the paired latency ratio's p10-p90 over rounds (over seeds,
    the lowest p10 to the highest p90). Colour is the quantization recipe, and each other
    coordinate that varies (but the seed) is in the point's label, with a marker per combination."""
    if "headline_value" not in table:
        return None
    points = table[table["status"] == "ok"]
    phases = [""] + (["prefill_"] if shipped_latency(points, "prefill_p50_ms").notna().any() else [])
    drawn = [(phase, _quality_points(points, phase)) for phase in phases]
    drawn = [(phase, p, label) for phase, (p, label) in drawn if not p.empty]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, len(drawn), figsize=(8 * len(drawn), 5), squeeze=False)
    for ax, (_, phase_points, xlabel) in zip(axes[0], drawn, strict=True):
        _quality_panel(ax, phase_points, xlabel)
    fig.tight_layout()
    return fig


def _quality_points(points: pd.DataFrame, phase: str) -> tuple[pd.DataFrame, str]:
    latency, xlabel = pareto_latency(points, phase)
    spread = {q: shipped_latency(points, f"{phase}ratio_{q}_to_float") for q in ("p10", "p90")}
    points = points.assign(latency=latency, x_low=spread["p10"], x_high=spread["p90"])
    return points.dropna(subset=["headline_value", "latency"]), xlabel


def _quality_panel(ax: Any, points: pd.DataFrame, xlabel: str) -> None:
    varying = [c for c in varying_coordinates(points) if c not in _NOT_IN_LABEL]
    labels = (
        points[varying].fillna("-").astype(str).agg(", ".join, axis=1)
        if varying
        else pd.Series("", index=points.index)
    )
    means = _seed_means(points.assign(label=labels))
    _draw_points(ax, points.assign(label=labels), means, "paired" in xlabel)
    better = means["headline_value"].where(means["higher_is_better"], -means["headline_value"])
    front = means[pareto_mask(means["latency"], better)].sort_values("latency")
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
    legend_title = ", ".join(c.split(".", 1)[1] for c in varying)
    legend_title = f"quant ({legend_title})" if legend_title else "quant"
    if (means["seeds"] > 1).any():
        legend_title += "; mean of n seeds, faint: each seed"
    ax.set(xlabel=xlabel, ylabel=metric, title=f"{metric} vs {xlabel.split(' /')[0].split(' p50')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", title=legend_title, title_fontsize=7)


def _seed_groups(points: pd.DataFrame) -> pd.Series:
    """Which points are seeds of one point: results.json's `seed_group_hash` (the config less the
    seed); a point without one (recorded before it) stands alone."""
    groups = points.get("seed_group_hash", pd.Series(None, index=points.index, dtype=object))
    return groups.fillna(points["point"])


def _seed_means(points: pd.DataFrame) -> pd.DataFrame:
    """One row per seed group: the mean latency and headline figure of its seeds, and their bars
    (for several seeds the figure's t-interval over them, `seeds_low`/`seeds_high`; for one its
    own interval over the test examples)."""
    rows = []
    for _, group in points.groupby(_seed_groups(points), sort=False):
        first, several = group.iloc[0], len(group) > 1
        rows.append(
            {
                "choices.quant": str(first["choices.quant"]),
                "label": first["label"],
                "seeds": len(group),
                "higher_is_better": first["higher_is_better"],
                "latency": group["latency"].mean(),
                "x_low": group["x_low"].min(),
                "x_high": group["x_high"].max(),
                "headline_value": group["headline_value"].mean(),
                "y_low": first.get("seeds_low" if several else "headline_low", np.nan),
                "y_high": first.get("seeds_high" if several else "headline_high", np.nan),
            }
        )
    return pd.DataFrame(rows)


def _draw_points(ax: Any, points: pd.DataFrame, means: pd.DataFrame, paired: bool) -> None:
    """One error-bar series per (quant, other varying coordinates), at its seeds' mean: colour by
    quant, marker by the rest; the seeds of a point faint behind it, unlabelled."""
    colours = dict(zip(sorted(means["choices.quant"].unique()), itertools.cycle(plt.cm.tab10.colors)))
    markers = dict(zip(sorted(means["label"].unique()), itertools.cycle(_MARKERS)))
    for (quant, label), group in means.groupby(["choices.quant", "label"]):
        seeds = group["seeds"].max()
        ax.errorbar(
            group["latency"],
            group["headline_value"],
            xerr=_bars(group["latency"], group["x_low"], group["x_high"]) if paired else None,
            yerr=_bars(group["headline_value"], group["y_low"], group["y_high"]),
            color=colours[quant],
            marker=markers[label],
            markersize=7,
            linestyle="none",
            capsize=3,
            label=f"{quant}" + (f" ({label})" if label else "") + (f", {seeds} seeds" if seeds > 1 else ""),
        )
    seeded = points[_seed_groups(points).duplicated(keep=False)]
    for (quant, label), group in seeded.groupby([seeded["choices.quant"].astype(str), "label"]):
        ax.scatter(
            group["latency"],
            group["headline_value"],
            color=colours[quant],
            marker=markers[label],
            s=25,
            alpha=SEED_ALPHA,
            zorder=1,
        )


def _bars(centre: pd.Series, low: pd.Series | None, high: pd.Series | None) -> list[list[float]] | None:
    """Error bar lengths below and above each centre; None (no bar) where bounds are missing."""
    if low is None or high is None or low.isna().all():
        return None
    return [(centre - low).fillna(0).clip(lower=0).tolist(), (high - centre).fillna(0).clip(lower=0).tolist()]


def _bench_points(table: pd.DataFrame, scenario: str) -> pd.DataFrame:
    """A benchmark's ok rows of one scenario (rows from before generation timing are forwards)."""
    if "bench.seq_len" not in table:
        return table.iloc[:0]
    points = table[(table["status"] == "ok") & (table.get("bench.status") == "ok")]
    rows = points.get("bench.scenario", pd.Series("forward", index=points.index)).fillna("forward")
    return points[rows == scenario]


def _bench_label(row_keys: tuple[Any, ...]) -> str:
    attention, backend, device, dtype, batch, quant, variant = row_keys
    model = f"{quant} {variant}" if str(quant) not in ("fp32", "nan", "None") else "float"
    return f"{attention} {model} ({backend}, {device} {dtype}, batch {int(batch)})"


_BENCH_SERIES = [
    "attention_kernel",
    "bench.backend",
    "bench.device",
    "bench.dtype",
    "bench.batch_size",
    "bench.quant",
    "bench.variant",
]


def _series(points: pd.DataFrame) -> Any:
    """The benchmark's lines: one per attention, backend, device, dtype, batch and model timed."""
    keyed = points.assign(**{c: points.get(c, "fp32") for c in _BENCH_SERIES[-2:]})
    keyed = keyed.fillna({c: "fp32" for c in _BENCH_SERIES[-2:]})
    for keys, group in keyed.groupby(_BENCH_SERIES):
        yield _bench_label(keys), group.sort_values("bench.seq_len")


def _length_axes(axes: Any, points: pd.DataFrame, ylabels: list[str]) -> None:
    lengths = sorted(int(n) for n in points["bench.seq_len"].unique())
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel="sequence length (tokens)", ylabel=ylabel)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)


def attention_scaling(table: pd.DataFrame) -> Figure | None:
    """Benchmarks of one forward: latency and peak memory against sequence length."""
    points = _bench_points(table, "forward")
    if points.empty:
        return None
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, group in _series(points):
        lat.plot(group["bench.seq_len"], group["bench.p50_ms"], marker="o", label=label)
        mem.plot(group["bench.seq_len"], group["peak_mib"], marker="o", label=label)
    _length_axes((lat, mem), points, ["latency p50 (ms)", "peak memory of one forward (MiB)"])
    fig.suptitle("Attention scaling")
    fig.tight_layout()
    return fig


def generation_scaling(table: pd.DataFrame) -> Figure | None:
    """Benchmarks of generation against context length: prefill latency, decode tokens/s, and the
    peak memory of one generation with the KV cache's share of it (dashed)."""
    points = _bench_points(table, "generate")
    if points.empty:
        return None
    fig, (prefill, decode, mem) = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = itertools.cycle(plt.cm.tab10.colors)
    for label, group in _series(points):
        colour = next(colours)
        x = group["bench.seq_len"]
        prefill.plot(x, group["bench.prefill_p50_ms"], marker="o", color=colour, label=label)
        decode.plot(x, group["bench.tokens_per_s"], marker="o", color=colour, label=label)
        mem.plot(x, group["peak_mib"], marker="o", color=colour, label=f"{label}: peak")
        mem.plot(x, group["bench.kv_cache_bytes"] / 2**20, ls="--", color=colour, label=f"{label}: KV cache")
    ylabels = [
        "prefill latency p50 (ms)",
        "decode tokens/s (p50 per token)",
        "memory of one generation (MiB)",
    ]
    _length_axes((prefill, decode, mem), points, ylabels)
    fig.suptitle("Generation scaling: prefill, decode and memory against context length")
    fig.tight_layout()
    return fig


def model_sizes(table: pd.DataFrame) -> Figure | None:
    """Quantized artifact against float size, one pair of bars per point. The seeds of a point ship one
    architecture, so they are one pair (their mean, "n seeds" in the label) rather than n pairs a
    reader cannot tell apart; the label names the quant and every other coordinate that varies."""
    if "model.quantized_bytes" not in table:
        return None
    points = table[(table["status"] == "ok")].dropna(subset=["model.quantized_bytes"])
    if points.empty:
        return None
    groups = points.groupby(_seed_groups(points), sort=False)
    sizes = groups[["model.float_bytes", "model.quantized_bytes"]].mean() / 1e6
    varying = varying_coordinates(points)
    labels = [_size_label(seeds, varying) for _, seeds in groups]  # in the order of `sizes`
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(sizes) + 1.5))
    y = range(len(sizes))
    ax.barh([i + 0.2 for i in y], sizes["model.float_bytes"], height=0.4, label="float")
    ax.barh([i - 0.2 for i in y], sizes["model.quantized_bytes"], height=0.4, label="quantized artifact")
    ax.set_yticks(list(y), labels)
    ax.set(xlabel="size on disk (MB)", title="quantized vs float model size")
    ax.legend()
    fig.tight_layout()
    return fig


def _size_label(seeds: pd.DataFrame, varying: list[str]) -> str:
    """A point's bar label: its quant, its other varying coordinates but the seed, its seed count."""
    first = seeds.iloc[0]
    others = [f"{c.split('.', 1)[1]}={first[c]}" for c in varying if c not in _NOT_IN_LABEL]
    seeds_note = [f"{len(seeds)} seeds"] if len(seeds) > 1 else []
    return ", ".join([str(first["choices.quant"]), *others, *seeds_note])


def perplexity_vs_size(table: pd.DataFrame) -> Figure | None:
    """Language-modelling jobs: test perplexity (95 % bootstrap interval over windows) against the
    size of the model each ships (its quantized artifact, or the float state_dict), one colour per recipe."""
    if "headline" not in table or "model.float_bytes" not in table:
        return None
    points = table[(table["status"] == "ok") & (table["headline"] == "test/ppl")]
    if points.empty:
        return None
    quantized = (
        points["model.quantized_bytes"]
        if "model.quantized_bytes" in points
        else pd.Series(float("nan"), index=points.index)
    )
    points = points.assign(size_mb=quantized.fillna(points["model.float_bytes"]) / 1e6)
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
    "sensitivity": sensitivity_chart,
    "front": front_chart,
    "scaling": attention_scaling,
    "generation": generation_scaling,
    "sizes": model_sizes,
    "ppl_vs_size": perplexity_vs_size,
}
