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

from qatflash.attention import check_attention, check_mask_support, check_model_supports, masked_decode
from qatflash.bench.points import PointJob, run_point
from qatflash.bench.saved_run import open_run
from qatflash.config import DTYPE_PRECISIONS, BenchAppConfig
from qatflash.errors import ConfigError, require
from qatflash.job import JobContext, environment, open_job, resolve_device
from qatflash.models import check_fits_host, check_positions, declared_config, model_class, timed_length_key
from qatflash.quant import make_recipe
from qatflash.results import QUANTIZED
from qatflash.tasks import TASKS
from qatflash.timing import TIMING_BACKENDS


def check_bench(cfg: BenchAppConfig, probe_kernel: bool = True) -> PretrainedConfig:
    """Refuse what cannot run here, before any point; returns the model's HF config. Without
    `probe_kernel` a forced SDPA kernel is not tried on the device (a dry run's CUDA is faked)."""
    device = resolve_device("bench.device", cfg.bench.device)
    precision = DTYPE_PRECISIONS[cfg.bench.dtype]
    check_attention(cfg.attention, precision, device, probe_kernel=probe_kernel)
    if probe_kernel:
        check_mask_support(cfg.attention, precision, device, masked_decode(cfg.benchmark))
    if cfg.bench.artifact is not None:
        run = open_run(cfg.bench.artifact)
        artifact_recipe = make_recipe(run.quant)
        artifact_recipe.check_device(device.type)  # the compute capability its kernels need, too
        target = artifact_recipe.target()
        if (device.type, cfg.bench.dtype) != (
            target.device,
            target.dtype,
        ) or "onnxruntime" in cfg.benchmark.backends:
            raise ConfigError(
                f"bench.artifact holds a {target} model, run through torch where its target says: use "
                f"bench.device={target.device} bench.dtype={target.dtype} and benchmark.backends from "
                f"[torch, torch_compile]; got {cfg.bench.device}, {cfg.bench.dtype}, {list(cfg.benchmark.backends)}"
            )
        hf_config = run.hf_config()
    else:
        hf_config = declared_config(cfg.model)
    for backend in cfg.benchmark.backends:
        TIMING_BACKENDS.create(backend).check(cfg.bench.device, cfg.bench.dtype)
    task = TASKS.load(cfg.task.name)
    artifact_recipe = make_recipe(open_run(cfg.bench.artifact).quant) if cfg.bench.artifact else None
    task.check_timing(cfg.benchmark, artifact_recipe)
    _check_quant(cfg)
    check_model_supports(cfg.attention, model_class(hf_config, task.auto_model))
    if device.type == "cpu" and cfg.bench.artifact is None:
        key = f"bench.device=cpu bench.dtype={cfg.bench.dtype}"
        check_fits_host(hf_config, task.auto_model, getattr(torch, cfg.bench.dtype), key)
    # a generation's last decode step sits new_tokens past the prompt
    new_tokens = cfg.benchmark.new_tokens
    check_positions(
        hf_config,
        timed_length_key("bench.seq_lens", new_tokens),
        [s + new_tokens for s in cfg.bench.seq_lens],
    )
    return hf_config


# What a benchmark can quantize without data: nothing to calibrate or train.
DATA_FREE_METHODS = ("none", "ptq_dynamic", "ptq_weight_only")


def _check_quant(cfg: BenchAppConfig) -> None:
    """A `quant` recipe a benchmark applies to the built model: one that needs no data, on a device its
    kernels run on, and not beside an artifact (which brings its own)."""
    quant = cfg.quant
    if quant.method == "none":
        return
    if quant.method not in DATA_FREE_METHODS:
        raise ConfigError(
            f"quant.method={quant.method} needs data (calibration or training), which qatflash-bench has "
            f"none of; use a recipe of method {list(DATA_FREE_METHODS[1:])}, or bench.artifact=<a trained run>"
        )
    if cfg.bench.artifact is not None:
        raise ConfigError(
            f"bench.artifact={cfg.bench.artifact} brings its own quantized model; leave quant=fp32 with it"
        )
    recipe = make_recipe(quant)
    recipe.check_device(cfg.bench.device)
    dtype = recipe.target().dtype
    if dtype != "float32":  # float32 targets' kernels take other dtypes too; these need theirs
        require(
            cfg.bench.dtype == dtype,
            f"bench.dtype={cfg.bench.dtype}: quant.api={quant.api} makes {recipe.target().format}, which runs in {dtype}",
        )


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
        "quant": job.choices.get("quant", "fp32"),
        "new_tokens": cfg.benchmark.new_tokens,
        "kv_cache": cfg.benchmark.kv_cache,
        "overrides": job.overrides,
    }
    with open_job(job, cfg.logger, cfg.seed, params) as opened:
        hf_config = check_bench(cfg)
        record = opened.record
        record.update("env", environment(resolve_device("bench.device", sweep.device)))
        record.update("model", {"model_type": hf_config.model_type, "layers": hf_config.num_hidden_layers})
        tracked = {**job.choices, **params, "experiment": cfg.experiment_name, "config": job.resolved_config}
        tracker = opened.track(job.run_name(sweep.dtype), "bench", tracked)
        for seq_len, batch_size, backend in itertools.product(
            sweep.seq_lens, sweep.batch_sizes, cfg.benchmark.backends
        ):
            point = PointJob(
                task=cfg.task,
                model=cfg.model,
                attention=cfg.attention,
                timing=cfg.benchmark,
                sweep=sweep,
                quant=cfg.quant,
                quant_name=params["quant"],
                seq_len=seq_len,
                batch_size=batch_size,
                backend=backend,
                seed=cfg.seed,
            )
            record.update("latency", run_point(point))
            record.save()
        tracker.summarize(_summary(record.data["latency"]))
    return record.data


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat W&B summary keys: bench/<backend>/L<seq>/B<batch>[/<variant>]/<figure> (the variant
    where a point times a quantized model beside its float one)."""
    summary: dict[str, Any] = {}
    for row in rows:
        prefix = f"bench/{row['backend']}/L{row['seq_len']}/B{row['batch_size']}"
        if row.get("variant") == QUANTIZED:
            prefix += f"/{QUANTIZED}"
        summary[f"{prefix}/status"] = row["status"]
        for key in (
            "p50_ms",
            "p90_ms",
            "rel_stdev",
            "tokens_per_s",
            "peak_memory_bytes",
            "prefill_p50_ms",
            "kv_cache_bytes",
            "ratio_to_float",
        ):
            if key in row:
                summary[f"{prefix}/{key}"] = row[key]
    return summary
