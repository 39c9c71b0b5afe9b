"""results.json: one per job, the only record a sweep or report trusts.

The file is written whole to a temporary name and renamed, so a reader sees the old version or the
new one, never half of one. A job marks itself `running` before any work, so a killed job can never
be mistaken for a finished one; only a job that completed every step is `ok`. Reading and writing
results needs no torch, so the report starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from qatflash.errors import first_line

# Schema 2 names a job's models `float` and `quantized` (with the recipe's `format` beside them),
# where schema 1 said fp32 and int8 for every recipe, int4 and nf4 ones too; `read_results` reads
# schema 1 as schema 2 (`upgrade`), so an old sweep still reports and resumes.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
RESULTS_FILE = "results.json"
# The HF config of a run's model, beside its artifact: what rebuilds the artifact's skeleton.
MODEL_CONFIG_FILE = "model_config.json"
TRACEBACK_FILE = "traceback.txt"
# Per-example test results of every model a job tested, one row per (model, example): what the
# report's intervals and paired tests are computed from.
EXAMPLES_FILE = "examples.parquet"
# A float job's per-group sensitivity (one row per precision and module group, written as each is
# measured: what a killed job resumes from) and the mixed-precision front searched from it; the
# mixes it chose are quant configs under the sweep's MIXES_DIR/quant/ (`qatflash.sensitivity`).
SENSITIVITY_FILE = "sensitivity.csv"
FRONT_FILE = "front.csv"
MIXES_DIR = "mixes"

# The models a job tests and times, as metric suffixes, examples.parquet's `model` column and
# latency variants name them: the float model (fine-tuned, or QAT's model before fine-tuning), QAT's
# fake-quantized model, the recipe's quantized model, and the float model timed where the quantized
# one runs when that is elsewhere than where it trained (CPU INT8 after a CUDA fit).
FLOAT, FAKEQUANT, QUANTIZED, FLOAT_AT_TARGET = "float", "fakequant", "quantized", "float_at_target"
# Schema 1's names for them (ONNX Runtime's: its float export, its own dynamic INT8, the recipe's
# QDQ graph); names schema 1 shares with schema 2 are left out.
_V1_MODELS = {
    "fp32": FLOAT,
    "int8": QUANTIZED,
    "fp32_cpu": FLOAT_AT_TARGET,
    "ort_fp32": f"ort_{FLOAT}",
    "ort_int8_qdq": "ort_qdq",
}
# ONNX Runtime's latency variants in schema 1 (its `int8` is its own dynamic INT8: kept).
_V1_ORT_VARIANTS = {"fp32": FLOAT, "int8_qdq": "qdq"}
_V1_MODEL_KEYS = {
    "int8_artifact": "artifact",
    "int8_bytes": "quantized_bytes",
    "fp32_bytes": "float_bytes",
    "int8_rerun_spread": "quantized_rerun_spread",
    "fp32_reused_from": "float_reused_from",
    "onnx_fp32_bytes": "onnx_float_bytes",
    "onnx_int8_qdq_bytes": "onnx_qdq_bytes",
    "onnx_int8_qdq_skipped": "onnx_qdq_skipped",
}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (unique per process) to write to; renamed onto `path` when
    the block ends without error, removed in every case, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())


def read_results(path: Path) -> dict[str, Any] | None:
    """The results of a job folder or file in schema 2 (schema 1 read as schema 2), or None when
    absent or unreadable (truncated, not JSON)."""
    path = path / RESULTS_FILE if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return upgrade(data) if data.get("schema") == 1 else data


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record as schema 2 records the same job: models, metric suffixes, latency
    variants and fields, and model-section keys under their schema-2 names."""
    latency = [_v1_latency_row(row) for row in data.get("latency") or []]
    model = {_V1_MODEL_KEYS.get(k, k): v for k, v in (data.get("model") or {}).items()}
    metrics = {_v1_metric(k): v for k, v in (data.get("metrics") or {}).items()}
    examples = data.get("examples")
    if isinstance(examples, dict):
        examples = {**examples, "models": [_V1_MODELS.get(m, m) for m in examples.get("models", [])]}
    return {**data, "schema": 2, "latency": latency, "model": model, "metrics": metrics, "examples": examples}


def _v1_metric(key: str) -> str:
    """`test/acc_int8` -> `test/acc_quantized`: a metric whose suffix is a schema-1 model name
    (the longest that fits: `_ort_int8` is ONNX Runtime's INT8, not the recipe's)."""
    for old, new in sorted({**_V1_MODELS, "ort_int8": "ort_int8"}.items(), key=lambda kv: -len(kv[0])):
        if key.endswith(f"_{old}"):
            return f"{key[: -len(old)]}{new}"
    return key


def _v1_latency_row(row: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 latency row: its variant renamed, and every `fp32` in its field names and
    references (ratio_to_fp32, ratio_reference fp32/torch) said as `float`, each reference renamed
    as the row it names is (an ONNX Runtime row's torch reference may be fp32_cpu/torch)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str) and key.endswith("reference"):
            variant, _, backend = value.partition("/")
            value = f"{_v1_variant(variant, backend)}/{backend}" if backend else value
        out[key.replace("fp32", FLOAT)] = value
    out["variant"] = _v1_variant(row["variant"], row.get("backend"))
    return out


def _v1_variant(variant: str, backend: str | None) -> str:
    renames = _V1_ORT_VARIANTS if backend == "onnxruntime" else _V1_MODELS
    return renames.get(variant, variant)


def read_examples(folder: Path) -> Any:
    """A job folder's per-example results as a DataFrame (schema 1's model names read as schema
    2's), or None where the job wrote none (older points) or the file cannot be read."""
    import pandas as pd

    try:
        frame = pd.read_parquet(folder / EXAMPLES_FILE)
    except (OSError, ValueError):
        return None
    return frame.assign(model=frame["model"].replace(_V1_MODELS)) if "model" in frame else frame


def summary_figures(data: dict[str, Any]) -> dict[str, Any]:
    """A training job's figures under flat keys: its W&B summary, and what an optimising sweeper reads.

    metrics as they are (`test/acc`), latency rows as `latency/<variant>/<backend>/<field>`, and
    the model section as `model/<field>`.
    """
    latency = {
        f"latency/{row['variant']}/{row['backend']}/{k}": v for row in data["latency"] for k, v in row.items()
    }
    return {**data["metrics"], **latency, **{f"model/{k}": v for k, v in data["model"].items()}}


class RunRecord:
    """The results.json of one job: `running` on entry, `ok` or `failed` (with the error) on exit."""

    def __init__(
        self,
        folder: Path,
        choices: dict[str, Any],
        params: dict[str, Any],
        config_hash: str | None = None,
        write: bool = True,
    ) -> None:
        self.path = folder / RESULTS_FILE
        # False for the ranks but 0 of a multi-process launch: they keep the record, never write it.
        self.write = write
        # The record of the attempt before this one in the same folder: what a resume continues.
        self.previous = read_results(self.path)
        self.data: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "status": "running",
            "error": None,
            "attempt": int((self.previous or {}).get("attempt", 0)) + 1,
            # Set when this attempt continued an earlier one's checkpoint: the folder then holds both.
            "resumed_from": None,
            # Identifies the config that produced the record: a sweep skips an ok point only if it matches.
            "config_hash": config_hash,
            "choices": choices,
            "params": params,
            "metrics": {},
            "latency": [],
            "model": {},
            "timing": {},
            "env": {},
            "argv": sys.argv[1:],
            "warnings": [],
        }
        self._started = time.perf_counter()

    def update(self, section: str, values: dict[str, Any] | list[Any]) -> None:
        current = self.data[section]
        if isinstance(current, list):
            current.extend(values)
        else:
            current.update(values)

    def save_examples(self, per_model: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Write `examples.parquet` (columns `model`, then the task's: index, target, prediction,
        score, loss, tokens) whole under a temporary name, and return what results.json says of it."""
        import pandas as pd

        frame = pd.concat(
            [pd.DataFrame(columns).assign(model=model) for model, columns in per_model.items()],
            ignore_index=True,
        )
        frame = frame[["model", *(c for c in frame.columns if c != "model")]]
        path = self.path.parent / EXAMPLES_FILE
        if self.write:
            with atomic_path(path) as tmp:
                frame.to_parquet(tmp, index=False)
        return {
            "file": EXAMPLES_FILE,
            "models": list(per_model),
            "rows": len(frame) // max(len(per_model), 1),
        }

    def save(self) -> None:
        """Write the record as it stands (still `running`): progress of a long job, readable at any time."""
        if self.write:
            write_json_atomic(self.path, self.data)

    def __enter__(self) -> RunRecord:
        self.save()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.data["timing"]["total_s"] = round(time.perf_counter() - self._started, 3)
        if exc is None:
            self.data["status"] = "ok"
        else:
            self.data["status"] = "failed"
            self.data["error"] = first_line(exc)
            self.data["traceback"] = TRACEBACK_FILE
            if self.write:
                trace = "".join(traceback.format_exception(exc_type, exc, tb))
                (self.path.parent / TRACEBACK_FILE).write_text(trace)
        self.save()
