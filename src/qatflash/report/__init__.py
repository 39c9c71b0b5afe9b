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

import pandas as pd

from qatflash.report.collect import Collected, collect
from qatflash.report.figures import FIGURES, shipped_latency

# The columns of the Markdown/HTML summary tables (the CSV keeps every column).
_TRAIN_COLUMNS = {
    "point": "point",
    "status": "status",
    "choices.quant": "quant",
    "choices.attention": "attention",
    "params.max_length": "max len",
    "headline": "metric",
    "headline_value": "test figure",
    "headline_delta": "Δ vs FP32",
    "latency.fp32.torch.p50_ms": "FP32 p50 ms",
    "shipped_p50_ms": "shipped p50 ms",
    "shipped_ratio_to_fp32": "shipped / FP32 latency (paired)",
    "metrics.model/size_ratio": "INT8/FP32 size",
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
    "bench.p50_ms": "p50 ms",
    "bench.rel_stdev": "rel. stdev",
    "peak_mib": "peak MiB",
    "bench.status": "status",
    "bench.error": "error",
}

# Figures are rounded to what their spread supports.
_DECIMALS = {
    "headline_value": 4,
    "headline_delta": 4,
    "metrics.model/size_ratio": 3,
    "latency.fp32.torch.p50_ms": 1,
    "shipped_p50_ms": 1,
    "shipped_ratio_to_fp32": 2,
    "bench.p50_ms": 1,
    "bench.rel_stdev": 3,
    "peak_mib": 1,
}


@dataclass
class Report:
    folder: Path
    files: list[Path]
    points: int
    skipped: list[tuple[str, str]]


def write_report(sweeps: list[Path], out: Path) -> Report:
    """Write every output into `out`; returns what was written and what was skipped."""
    collected = collect(sweeps)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(collected)
    files = [out / "results.csv"]
    table.to_csv(files[0], index=False)
    summaries = _summaries(table, sweeps)
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


def _table(collected: Collected) -> pd.DataFrame:
    table = pd.DataFrame(collected.rows)
    if not table.empty:
        table = _with_headline(table)
        table["shipped_p50_ms"] = shipped_latency(table)
        table["shipped_ratio_to_fp32"] = shipped_latency(table, "ratio_to_fp32")
        if "bench.peak_memory_bytes" in table:
            table["peak_mib"] = table["bench.peak_memory_bytes"] / 2**20
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
        pareto = report.folder / "pareto.png"
        if pareto.is_file():
            logged["pareto"] = wandb.Image(str(pareto))
        run.log(logged)
        return run.dir
    finally:
        run.finish()
