"""Gather sweep folders' results.json into flat rows: one per training job, one per benchmark point.

Column names are stable (`task.*`, `choices.*`, `params.*`, `metrics.*`, `model.*`, `timing.*`, and
for a training job `latency.<variant>.<backend>.<figure>`), so a CSV from one sweep lines up with the
next. A file that cannot be read, or a job that never finished (`running`), is skipped and listed
with the reason: a report never crashes on one bad point and never shows a partial one as a result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatflash.results import RESULTS_FILE, SCHEMA_VERSION, read_results

REPORT_SCHEMA = 1
_SECTIONS = ("task", "choices", "params", "metrics", "model", "timing", "examples", "sensitivity")
# Latency figures carried into a training job's row (per variant and backend).
_LATENCY_FIGURES = (
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "rel_stdev",
    "ratio_to_float",
    "ratio_p10_to_float",
    "ratio_p90_to_float",
    "tokens_per_s",
    "ratio_reference",
    "ratio_to_torch_float",
    "torch_float_reference",
    "host_other_cpu",
    "host_steal",
    "host_busy",
    "threads",
    "iters",
    "seq_len",
    "batch_size",
    # generation rows: the figures above are decode's (per token); prefill's and the cache beside them
    "scenario",
    "prefill_p50_ms",
    "prefill_ratio_to_float",
    "prefill_ratio_p10_to_float",
    "prefill_ratio_p90_to_float",
    "kv_cache_bytes",
)


@dataclass
class Collected:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def collect(folders: Iterable[Path]) -> Collected:
    """Every results.json under `folders` (recursively), flattened; unreadable or unfinished ones skipped."""
    out = Collected()
    for path in sorted({p for folder in folders for p in _results_files(folder)}):
        data = read_results(path)
        reason = _unusable(data)
        if reason:
            out.skipped.append((str(path.parent), reason))
            continue
        assert data is not None
        out.rows.extend(_flatten(data, path.parent))
    return out


def _results_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    return list(folder.rglob(RESULTS_FILE))


def _unusable(data: dict[str, Any] | None) -> str | None:
    if data is None:
        return "unreadable (truncated or not JSON)"
    if data.get("schema") != SCHEMA_VERSION:
        return f"results schema {data.get('schema')!r}, this report reads {SCHEMA_VERSION}"
    if data.get("status") not in ("ok", "failed"):
        return f"unfinished (status {data.get('status')!r}): killed or still running"
    return None


def _flatten(data: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    base: dict[str, Any] = {
        "report_schema": REPORT_SCHEMA,
        "point": str(folder),
        "status": data["status"],
        "error": data.get("error"),
        "attempt": data.get("attempt"),
        "reference_hash": data.get("reference_hash"),
        "seed_group_hash": data.get("seed_group_hash"),
    }
    for section in _SECTIONS:
        for key, value in (data.get(section) or {}).items():
            if isinstance(value, int | float | str | bool) or value is None:
                base[f"{section}.{key}"] = value
    base.update(_coverage((data.get("model") or {}).get("coverage")))
    rows = data.get("latency") or []
    if "seq_lens" in (data.get("params") or {}):  # qatflash-bench: every (seq, batch, backend) is a point
        return [{**base, **{f"bench.{k}": v for k, v in row.items()}} for row in rows] or [base]
    for row in rows:
        prefix = f"latency.{row['variant']}.{row['backend']}"
        base.update({f"{prefix}.{k}": row[k] for k in _LATENCY_FIGURES if k in row})
    return [base]


def _coverage(coverage: dict[str, Any] | None) -> dict[str, Any]:
    """A quantized job's coverage as two columns: quantized of all weight-matrix modules per type
    ("Conv1D 12/12, Embedding 1/2") and the share of weight elements quantized."""
    if not coverage:
        return {}
    by_type = coverage["by_type"]
    return {
        "coverage.modules": ", ".join(
            f"{kind} {row['quantized_modules']}/{row['modules']}" for kind, row in by_type.items()
        ),
        "coverage.quantized_weight_share": coverage["quantized_weight_share"],
    }
