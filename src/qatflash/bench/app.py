"""`qatflash-bench`: latency and memory of a model without training, over seq_len × batch × backend.

It shares the training app's `task`, `model`, `attention`, `benchmark` (timing) and `logger`
groups, so a benchmark and a training sweep describe a model the same way, and the job envelope
(`qatflash.job`); it imports nothing of the training job. Every check that can refuse the job
(attention on this device, a backend's extra, lengths against the model's positions) runs before
the first point and before the tracker starts.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from transformers import PretrainedConfig

from qatflash.attention import check_attention, check_model_supports
from qatflash.bench.points import PointJob, run_point
from qatflash.bench.saved_run import open_run
from qatflash.config import DTYPE_PRECISIONS, BenchAppConfig
from qatflash.errors import ConfigError
from qatflash.job import JobContext, environment, open_job
from qatflash.models import check_positions, declared_config, model_class
from qatflash.tasks import TASKS
from qatflash.timing import TIMING_BACKENDS


def check_bench(cfg: BenchAppConfig) -> PretrainedConfig:
    """Refuse what cannot run here, before any point; returns the model's HF config."""
    device = torch.device(cfg.bench.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device=cuda but no CUDA device is visible; use bench.device=cpu")
    check_attention(cfg.attention, DTYPE_PRECISIONS[cfg.bench.dtype], device)
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
    for backend in cfg.benchmark.backends:
        TIMING_BACKENDS.create(backend).check(cfg.bench.device, cfg.bench.dtype)
    check_model_supports(cfg.attention, model_class(hf_config, TASKS.load(cfg.task.name).auto_model))
    check_positions(hf_config, "bench.seq_lens", list(cfg.bench.seq_lens))
    return hf_config


def run_benchmark(cfg: BenchAppConfig, job: JobContext) -> dict[str, Any]:
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
    with open_job(job, cfg.logger, cfg.seed, params) as opened:
        hf_config = check_bench(cfg)
        record = opened.record
        record.update("env", environment(torch.device(sweep.device)))
        record.update("model", {"model_type": hf_config.model_type, "layers": hf_config.num_hidden_layers})
        tracked = {**job.choices, **params, "experiment": cfg.experiment_name, "config": job.resolved_config}
        tracker = opened.track(job.run_name(sweep.dtype), "bench", tracked)
        for seq_len, batch_size, backend in itertools.product(
            sweep.seq_lens, sweep.batch_sizes, cfg.benchmark.backends
        ):
            point = PointJob(
                cfg.task,
                cfg.model,
                cfg.attention,
                cfg.benchmark,
                sweep,
                seq_len,
                batch_size,
                backend,
                cfg.seed,
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
