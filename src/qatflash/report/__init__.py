"""`qatflash-report <sweep dir>...`: results.csv, report.md, PNG plots and a self-contained report.html.

The report reads only results.json files, so it works on any mix of training and benchmark sweeps,
on a sweep still running (unfinished points are listed as skipped), and on folders copied from
another machine.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qatflash.report.collect import Collected, collect
from qatflash.report.figures import FIGURES, shipped_latency
from qatflash.report.quality import STATISTICS, Margins, over_seeds, per_seed
from qatflash.report.recovery import recovery_over_seeds, recovery_per_seed
from qatflash.report.sensitivity import mixes_table, sensitivity_table
from qatflash.results import FLOAT, QUANTIZED

# The columns of the Markdown/HTML summary tables (the CSV keeps every column).
_TRAIN_COLUMNS = {
    "point": "point",
    "status": "status",
    "choices.quant": "quant",
    "choices.attention": "attention",
    "params.max_length": "max len",
    "headline": "metric",
    "headline_value": "test figure",
    "headline_delta": "Δ vs float",
    "latency.float.torch.p50_ms": "float p50 ms",
    "model.format": "format",
    "model.not_shipped": "not shipped",
    "shipped_p50_ms": "shipped p50 ms",
    "shipped_ratio_to_float": "shipped / float latency (paired)",
    "shipped_prefill_p50_ms": "shipped prefill p50 ms",
    "shipped_prefill_ratio_to_float": "shipped / float prefill (paired)",
    "shipped_host_busy": "host busy",
    "metrics.model/size_ratio": "quantized / float size",
    "coverage.quantized_weight_share": "quantized weight share",
    "coverage.modules": "quantized / modules, by type",
    "error": "error",
}
_BENCH_COLUMNS = {
    "point": "point",
    "attention_kernel": "attention",
    "bench.backend": "backend",
    "bench.device": "device",
    "bench.dtype": "dtype",
    "bench.seq_len": "tokens",
    "bench.batch_size": "batch",
    "bench.quant": "quant",
    "bench.variant": "model",
    "bench.scenario": "timed",
    "bench.prefill_p50_ms": "prefill p50 ms",
    "bench.p50_ms": "p50 ms (decode: per token)",
    "bench.rel_stdev": "rel. stdev",
    "bench.tokens_per_s": "tokens/s",
    "bench.ratio_to_float": "quantized / float (paired)",
    "bench.prefill_ratio_to_float": "prefill quantized / float (paired)",
    "bench.host_busy": "host busy",
    "peak_mib": "peak MiB",
    "kv_cache_mib": "KV cache MiB",
    "weight_mib": "weights MiB",
    "bench.status": "status",
    "bench.error": "error",
}

# Figures are rounded to what their spread supports.
_DECIMALS = {
    "headline_value": 4,
    "headline_delta": 4,
    "metrics.model/size_ratio": 3,
    "coverage.quantized_weight_share": 3,
    "latency.float.torch.p50_ms": 1,
    "shipped_p50_ms": 1,
    "shipped_ratio_to_float": 2,
    "shipped_prefill_p50_ms": 1,
    "shipped_prefill_ratio_to_float": 2,
    "bench.p50_ms": 1,
    "bench.prefill_p50_ms": 1,
    "bench.tokens_per_s": 1,
    "bench.ratio_to_float": 2,
    "bench.prefill_ratio_to_float": 2,
    "kv_cache_mib": 1,
    "weight_mib": 1,
    "bench.rel_stdev": 3,
    "peak_mib": 1,
}


@dataclass
class Report:
    folder: Path
    files: list[Path]
    points: int
    skipped: list[tuple[str, str]]


def write_report(sweeps: list[Path], out: Path, margins: Margins | None = None) -> Report:
    """Write every output into `out`; returns what was written and what was skipped. `margins`
    (default `Margins()`: 1 accuracy point, 2 % of perplexity) are the non-inferiority margins of
    the quality verdicts."""
    margins = margins or Margins()
    collected = collect(sweeps)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(collected)
    training = _training(table)
    seeds, groups = _quality(training, margins)
    recovered = recovery_per_seed(training, seeds) if not training.empty else pd.DataFrame()
    if not seeds.empty:
        table = _with_intervals(table, seeds, groups)
    files = [out / "results.csv"]
    table.to_csv(files[0], index=False)
    recovered_groups = recovery_over_seeds(recovered)
    sensitivity, mixes = sensitivity_table(table), mixes_table(table)
    tables = (
        ("quality_per_seed.csv", seeds),
        ("quality.csv", groups),
        ("recovery_per_seed.csv", recovered),
        ("recovery.csv", recovered_groups),
        ("sensitivity.csv", sensitivity),
        ("mixes.csv", mixes),
    )
    for name, frame in tables:
        if not frame.empty:
            files.append(out / name)
            frame.to_csv(files[-1], index=False)
    summaries = {
        **_quality_summaries(seeds, groups, sweeps, margins),
        **_recovery_summaries(recovered, recovered_groups, sweeps),
        **_over_and_per_seed(
            {"Mixed precision: the mix each budget chose, and the groups it keeps float (per length)": mixes},
            sweeps,
        ),
        **_summaries(table, sweeps),
    }
    images: dict[str, Path] = {}
    for name, plot in FIGURES.items():
        figure = plot(table) if not table.empty else None
        if figure is not None:
            images[name] = out / f"{name}.png"
            figure.savefig(images[name], dpi=120)
            files.append(images[name])
    files.append(out / "report.md")
    files[-1].write_text(_markdown(summaries, images, collected.skipped))
    files.append(out / "report.html")
    files[-1].write_text(_html(summaries, images, collected.skipped))
    return Report(out, files, len(table), collected.skipped)


def _training(table: pd.DataFrame) -> pd.DataFrame:
    """The finished training points, one row each (benchmark points have no quality figures)."""
    if table.empty:
        return table
    training = table[table["status"] == "ok"]
    if "bench.seq_len" in training:
        training = training[training["bench.seq_len"].isna()]
    return training.drop_duplicates("point")


def _quality(training: pd.DataFrame, margins: Margins) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per seed and over seeds, every tested model's quality figure and delta with their intervals."""
    if training.empty:
        return pd.DataFrame(), pd.DataFrame()
    seeds = per_seed(training, margins)
    return seeds, over_seeds(seeds, margins)


def _with_intervals(table: pd.DataFrame, seeds: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """The shipped model's headline intervals on each training row, the Pareto plot's error bars:
    over the point's test examples (`headline_low`, `headline_high`) and, from quality.csv, over
    the seeds of its point (`seeds_low`, `seeds_high`; none for one seed), so that the plot shows
    the tables' figures. Accuracy's for test/acc, perplexity's for test/ppl."""
    if "params.quant_method" not in table:
        return table
    shipped = seeds[seeds["model"] == seeds["point"].map(_shipped_model(table))]
    bounds = {"headline": shipped.set_index("point")}
    if not groups.empty:
        keys = ["seed_group_hash", "model"]
        bounds["seeds"] = shipped[["point", *keys]].merge(groups, on=keys, how="left").set_index("point")
    return table.assign(
        **{
            f"{name}_{bound}": _headline_bound(table, figures, bound)
            for name, figures in bounds.items()
            for bound in ("low", "high")
        }
    )


def _headline_bound(table: pd.DataFrame, figures: pd.DataFrame, bound: str) -> pd.Series:
    """Per row of `table`, the `bound` ("low", "high") of its headline figure in `figures` (one row
    per point): that of the statistic its task declares, the only one a point's row has."""
    out = pd.Series(np.nan, index=table.index)
    for name in STATISTICS:
        if f"{name}_{bound}" in figures:
            out = out.fillna(table["point"].map(figures[f"{name}_{bound}"]))
    return out


def _shipped_model(table: pd.DataFrame) -> pd.Series:
    """Per training point: the name of the model it ships in its examples (quantized or float)."""
    training = table.dropna(subset=["params.quant_method"]).drop_duplicates("point")
    shipped = training["params.quant_method"].map(lambda method: FLOAT if method == "none" else QUANTIZED)
    return pd.Series(shipped.to_numpy(), index=training["point"])


def _quality_summaries(
    seeds: pd.DataFrame, groups: pd.DataFrame, sweeps: list[Path], margins: Margins
) -> dict[str, pd.DataFrame]:
    """The quality tables as a reader reads them: accuracies and deltas in points (perplexity's
    delta in percent), intervals as [low, high]."""
    margin = f"margins {margins.describe()}"
    return _over_and_per_seed(
        {
            f"Quality over seeds (95 % intervals, accuracy's clipped to [0, 100]; verdict at {margin})": groups,
            "Quality per seed (paired bootstrap CI; McNemar's exact test, a permutation test of macro-F1, or Wilcoxon over windows)": seeds,
        },
        sweeps,
    )


def _recovery_summaries(
    per_seed: pd.DataFrame, groups: pd.DataFrame, sweeps: list[Path]
) -> dict[str, pd.DataFrame]:
    """Recovery over PTQ as a reader reads it: percent of PTQ's loss, the changes in points or percent."""
    return _over_and_per_seed(
        {
            "Recovery over PTQ of the same scheme, over seeds ((PTQ − QAT) / (PTQ − float), %; t-interval)": groups,
            "Recovery over PTQ per seed (paired bootstrap CI over the test examples)": per_seed,
        },
        sweeps,
    )


def _over_and_per_seed(tables: dict[str, pd.DataFrame], sweeps: list[Path]) -> dict[str, pd.DataFrame]:
    """The non-empty tables under their titles, readable, points named relative to their sweep."""
    out = {}
    for title, frame in tables.items():
        if frame.empty:
            continue
        if "point" in frame:
            frame = frame.assign(point=[_short(p, sweeps) for p in frame["point"]])
        out[title] = _readable(
            frame.drop(columns=["seed_group_hash", "ptq_seed_group_hash"], errors="ignore")
        )
    return out


def _readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Each figure with its interval beside it: accuracies and deltas ×100 (points, percent),
    perplexities as they are; the rest as it is."""
    frame = frame.copy()
    for name, scale, decimals in (
        ("accuracy", 100, 2),
        ("macro_f1", 100, 2),
        ("delta", 100, 2),
        ("ptq_delta", 100, 2),
        ("qat_delta", 100, 2),
        ("qat_vs_ptq", 100, 2),
        ("recovery", 100, 1),
        ("ppl", 1, 2),
        ("word_ppl", 1, 1),
    ):
        if name in frame:
            bounds = [frame.get(f"{name}_{b}", pd.Series(np.nan, index=frame.index)) for b in ("low", "high")]
            frame[name] = [
                _with_interval(v, lo, hi, scale, decimals)
                for v, lo, hi in zip(frame[name], *bounds, strict=True)
            ]
            frame = frame.drop(columns=[f"{name}_low", f"{name}_high"], errors="ignore")
    if "word_delta" in frame:
        frame["word_delta"] = (100 * frame["word_delta"]).round(2)
    for column in ("t", "mcnemar_p", "wilcoxon_p", "permutation_p"):
        if column in frame and pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].round(3)
    return frame.astype(object).where(frame.notna(), "")


def _with_interval(value: float, low: float, high: float, scale: float, decimals: int) -> str:
    if pd.isna(value):
        return ""
    if pd.isna(low):
        return f"{scale * value:.{decimals}f}"
    return f"{scale * value:.{decimals}f} [{scale * low:.{decimals}f}, {scale * high:.{decimals}f}]"


def _table(collected: Collected) -> pd.DataFrame:
    table = pd.DataFrame(collected.rows)
    if not table.empty:
        table = _with_headline(table)
        table["shipped_p50_ms"] = shipped_latency(table)
        table["shipped_ratio_to_float"] = shipped_latency(table, "ratio_to_float")
        table["shipped_host_busy"] = shipped_latency(table, "host_busy")
        table["shipped_prefill_p50_ms"] = shipped_latency(table, "prefill_p50_ms")
        table["shipped_prefill_ratio_to_float"] = shipped_latency(table, "prefill_ratio_to_float")
        for column, source in (
            ("peak_mib", "bench.peak_memory_bytes"),
            ("kv_cache_mib", "bench.kv_cache_bytes"),
            ("weight_mib", "bench.weight_bytes"),
        ):
            if source in table:
                table[column] = table[source] / 2**20
        if "bench.attention" in table:
            table["attention_kernel"] = _attention_kernels(table)
    return table


def _with_headline(table: pd.DataFrame) -> pd.DataFrame:
    """Each job's headline figure, by the name its results.json gives (`task.headline`; older
    results, all classification, read test/acc), with its delta to FP32 and its direction."""
    names = table.get("task.headline", pd.Series(None, index=table.index, dtype=object)).fillna("test/acc")
    higher = table.get("task.higher_is_better", pd.Series(None, index=table.index, dtype=object))

    def figure(suffix: str) -> list[float]:
        return [
            table.at[i, f"metrics.{name}{suffix}"] if f"metrics.{name}{suffix}" in table else None
            for i, name in names.items()
        ]

    return table.assign(
        headline=names,
        headline_value=figure(""),
        headline_delta=figure("_delta"),
        higher_is_better=higher.fillna(True).astype(bool),
    )


def _attention_kernels(table: pd.DataFrame) -> pd.Series:
    """`sdpa` left to choose its kernel and `sdpa` forced onto one are different points: `sdpa[flash]`."""
    attention = table["bench.attention"]
    forced = table.get("bench.sdpa_backend", pd.Series(None, index=table.index, dtype=object))
    return attention.where(forced.isna(), attention + "[" + forced.astype(str) + "]")


def _summaries(table: pd.DataFrame, sweeps: list[Path]) -> dict[str, pd.DataFrame]:
    """The readable tables: training points and benchmark points, with folder names relative to the sweep."""
    if table.empty:
        return {}
    table = table.assign(point=[_short(p, sweeps) for p in table["point"]])
    is_bench = (
        table["bench.seq_len"].notna() if "bench.seq_len" in table else pd.Series(False, index=table.index)
    )
    out = {}
    for title, rows, columns in (
        ("Training points", table[~is_bench], _TRAIN_COLUMNS),
        ("Benchmark points", table[is_bench], _BENCH_COLUMNS),
    ):
        if not rows.empty:
            present = {k: v for k, v in columns.items() if k in rows and rows[k].notna().any()}
            out[title] = rows[list(present)].round(_DECIMALS).rename(columns=present)
    return out


def _short(point: str, sweeps: list[Path]) -> str:
    for sweep in sweeps:
        try:
            return str(Path(point).resolve().relative_to(sweep.resolve())) or "."
        except ValueError:
            continue
    return point


def _markdown(
    summaries: dict[str, pd.DataFrame], images: dict[str, Path], skipped: list[tuple[str, str]]
) -> str:
    parts = ["# qatflash report", ""]
    for title, frame in summaries.items():
        parts += [f"## {title}", "", frame.to_markdown(index=False, floatfmt="g"), ""]
    parts += [f"![{name}]({path.name})" for name, path in images.items()]
    parts += ["", *_skipped_lines(skipped)]
    return "\n".join(parts) + "\n"


def _html(summaries: dict[str, pd.DataFrame], images: dict[str, Path], skipped: list[tuple[str, str]]) -> str:
    """One file with the tables and the plots inlined, to mail or attach as it is."""
    body = ["<h1>qatflash report</h1>"]
    for title, frame in summaries.items():
        body += [
            f"<h2>{html.escape(title)}</h2>",
            frame.to_html(index=False, float_format="{:g}".format, na_rep=""),
        ]
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode()
        body.append(f'<h2>{html.escape(name)}</h2><img alt="{name}" src="data:image/png;base64,{data}">')
    body += [f"<p>{html.escape(line)}</p>" for line in _skipped_lines(skipped)]
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>qatflash report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def _skipped_lines(skipped: list[tuple[str, str]]) -> list[str]:
    if not skipped:
        return []
    return [f"Skipped {len(skipped)} point(s):", *(f"- {path}: {reason}" for path, reason in skipped)]


def log_to_wandb(report: Report, project: str, mode: str) -> str:
    """The table and the Pareto plot in one summary W&B run (offline unless mode says otherwise)."""
    import wandb

    table = pd.read_csv(report.folder / "results.csv")
    run = wandb.init(project=project, job_type="report", mode=mode, dir=str(report.folder))
    try:
        logged: dict[str, Any] = {"results": wandb.Table(dataframe=table)}
        for name in ("quality", "quality_per_seed", "recovery", "recovery_per_seed"):
            if (report.folder / f"{name}.csv").is_file():
                logged[name] = wandb.Table(dataframe=pd.read_csv(report.folder / f"{name}.csv"))
        pareto = report.folder / "pareto.png"
        if pareto.is_file():
            logged["pareto"] = wandb.Image(str(pareto))
        run.log(logged)
        return run.dir
    finally:
        run.finish()
