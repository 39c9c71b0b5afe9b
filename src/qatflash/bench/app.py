"""`qatflash-bench`: latency and memory of a model without training, over seq_len × batch × backend.

It shares the training app's `model`, `attention`, `benchmark` (timing) and `logger` groups, so a
benchmark and a training sweep describe a model the same way. Every check that can refuse the job
(attention on this device, lengths against the model's positions) runs before the first point.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from qatflash.attention import check_attention, check_model_supports
from qatflash.bench.onnx import check_onnxruntime
from qatflash.bench.points import PointJob, run_point
from qatflash.bench.saved_run import open_run
from qatflash.config import BenchAppConfig, ConfigError
from qatflash.models import declared_config, max_positions, sequence_classifier_class
from qatflash.pipeline import JobContext
from qatflash.results import RunRecord, environment
from qatflash.tracking import Tracker

# The Lightning precision each dtype corresponds to, for the attention checks shared with training.
_PRECISION = {"float32": "32-true", "bfloat16": "bf16-true", "float16": "16-true"}


def check_bench(cfg: BenchAppConfig) -> Any:
    """Refuse what cannot run here, before any point; returns the model's HF config."""
    device = torch.device(cfg.bench.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device=cuda but no CUDA device is visible; use bench.device=cpu")
    check_attention(cfg.attention, _PRECISION[cfg.bench.dtype], device)
    if cfg.bench.artifact is not None:
        run = open_run(cfg.bench.artifact)
        if device.type != "cpu" or cfg.bench.dtype != "float32" or "onnxruntime" in cfg.benchmark.backends:
            raise ConfigError(
                f"bench.artifact runs INT8 kernels on the CPU through torch: use bench.device=cpu "
                f"bench.dtype=float32 and benchmark.backends from [torch, torch_compile]; got "
                f"{cfg.bench.device}, {cfg.bench.dtype}, {list(cfg.benchmark.backends)}"
            )
        hf_config = run.hf_config()
    else:
        hf_config = declared_config(cfg.model)
    if "onnxruntime" in cfg.benchmark.backends:
        check_onnxruntime()
        if device.type != "cpu" or cfg.bench.dtype != "float32":
            raise ConfigError(
                f"benchmark.backends includes onnxruntime, which runs float32 on the CPU here; "
                f"got bench.device={cfg.bench.device} bench.dtype={cfg.bench.dtype}"
            )
    check_model_supports(cfg.attention, sequence_classifier_class(hf_config))
    limit = max_positions(hf_config)
    too_long = [n for n in cfg.bench.seq_lens if limit is not None and n > limit]
    if too_long:
        raise ConfigError(
            f"bench.seq_lens holds {too_long}, beyond the model's position limit {limit}; "
            "use a model with larger max_position_embeddings (e.g. model=bert_long)"
        )
    return hf_config


def bench(cfg: BenchAppConfig, job: JobContext) -> dict[str, Any]:
    """Time every point; results.json is rewritten after each, so a long sweep shows its progress."""
    sweep = cfg.bench
    params = {
        "seq_lens": list(sweep.seq_lens),
        "batch_sizes": list(sweep.batch_sizes),
        "backends": list(cfg.benchmark.backends),
        "device": sweep.device,
        "dtype": sweep.dtype,
        "isolate": sweep.isolate,
        "artifact": sweep.artifact,
        "sdpa_backend": cfg.attention.sdpa_backend,
        "overrides": job.overrides,
    }
    record = RunRecord(job.folder, job.choices, params, job.config_hash)
    name = "-".join([job.choices.get("model", "?"), job.choices.get("attention", "?"), sweep.dtype])
    wandb_config = {**job.choices, **params, "experiment": cfg.experiment_name, "config": job.resolved_config}
    with record, Tracker(cfg.logger, job.folder, name, job.group, "bench", wandb_config) as tracker:
        record.data["warnings"] = tracker.warnings  # the same list: warnings at finish land too
        hf_config = check_bench(cfg)
        record.update("env", environment(torch.device(sweep.device)))
        record.update("model", {"model_type": hf_config.model_type, "layers": hf_config.num_hidden_layers})
        for seq_len, batch_size, backend in itertools.product(
            sweep.seq_lens, sweep.batch_sizes, cfg.benchmark.backends
        ):
            point = PointJob(
                cfg.model, cfg.attention, cfg.benchmark, sweep, seq_len, batch_size, backend, cfg.seed
            )
            record.update("latency", [run_point(point)])
            record.save()
        tracker.summarize(_summary(record.data["latency"]))
    return record.data


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat W&B summary keys: bench/<backend>/L<seq>/B<batch>/<figure>."""
    summary: dict[str, Any] = {}
    for row in rows:
        prefix = f"bench/{row['backend']}/L{row['seq_len']}/B{row['batch_size']}"
        summary[f"{prefix}/status"] = row["status"]
        for key in ("p50_ms", "p90_ms", "rel_stdev", "tokens_per_s", "peak_memory_bytes"):
            if key in row:
                summary[f"{prefix}/{key}"] = row[key]
    return summary
