"""One job of a sweep, top to bottom: checks, data, model, fit, test, latency, record.

Everything that can refuse the job (config ranges, attention on this device, sequence length
against the model's positions) runs before the first training batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qatflash.attention import check_attention, check_padding_support
from qatflash.bench import measure_forward_latency
from qatflash.config import Config, ConfigError
from qatflash.data import TextClassificationData
from qatflash.models import build_model, load_tokenizer, max_positions, model_config
from qatflash.module import SequenceClassifier
from qatflash.results import RunRecord, environment
from qatflash.tracking import Tracker

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class JobContext:
    """Where a job writes and how it names itself; filled from Hydra by the CLI."""

    folder: Path
    choices: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    group: str = "default"
    resolved_config: dict[str, Any] = field(default_factory=dict)


def resolve_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible; use cpu or auto"
            )
        return torch.device("cuda")
    return torch.device(accelerator if accelerator == "mps" else "cpu")


def run_name(cfg: Config, choices: dict[str, str]) -> str:
    parts = [choices.get(g, "?") for g in ("model", "data", "quant", "attention")]
    if cfg.attention.sdpa_backend:
        parts[-1] += f"-{cfg.attention.sdpa_backend}"
    return "-".join([*parts, f"L{cfg.data.max_length}", f"s{cfg.seed}"])


def job_params(cfg: Config, overrides: list[str]) -> dict[str, Any]:
    return {
        "max_length": cfg.data.max_length,
        "batch_size": cfg.data.batch_size,
        "precision": str(cfg.trainer.precision),
        "seed": cfg.seed,
        "sdpa_backend": cfg.attention.sdpa_backend,
        "train_subset": cfg.data.train_subset,
        "max_epochs": cfg.trainer.max_epochs,
        "max_steps": cfg.trainer.max_steps,
        "lr": cfg.model.optim.lr,
        "bench_batch_size": cfg.benchmark.batch_size,
        "bench_seq_len": cfg.benchmark.seq_len or cfg.data.max_length,
        "overrides": overrides,
    }


def run(cfg: Config, job: JobContext) -> dict[str, Any]:
    """Run one job and return its results; raises (after recording `failed`) when any step fails."""
    params = job_params(cfg, job.overrides)
    wandb_config = {**job.choices, **params, "experiment": cfg.experiment_name, "config": job.resolved_config}
    record = RunRecord(job.folder, job.choices, params)
    tracker_args = (run_name(cfg, job.choices), job.group, "train", wandb_config)
    with record, Tracker(cfg.logger, job.folder, *tracker_args) as tracker:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        device = resolve_device(cfg.trainer.accelerator)
        record.update("env", environment(device))
        check_attention(cfg.attention, str(cfg.trainer.precision), device)

        data = TextClassificationData(cfg.data, partial(load_tokenizer, cfg.model), cfg.seed)
        data.setup()
        check_padding_support(cfg.attention, str(cfg.trainer.precision), device, data.pads_batches)
        hf_config = model_config(cfg.model, data.num_labels, vocab_size=len(data.tokenizer))
        bench_len = cfg.benchmark.seq_len or cfg.data.max_length
        _check_length(hf_config, ("data.max_length", cfg.data.max_length), ("benchmark.seq_len", bench_len))
        model = build_model(cfg.model, cfg.attention, hf_config)
        module = SequenceClassifier(model, cfg.model.optim, data.num_labels, cfg.attention.sdpa_backend)
        record.update(
            "model", {"parameters": sum(p.numel() for p in model.parameters()), "num_labels": data.num_labels}
        )

        trainer = L.Trainer(
            **asdict(cfg.trainer),
            logger=tracker.lightning_logger,
            default_root_dir=str(job.folder),
            enable_checkpointing=False,
        )
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        fit_s = time.perf_counter() - started
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        started = time.perf_counter()
        metrics.update(
            {k: float(v) for k, v in trainer.test(module, datamodule=data, verbose=False)[0].items()}
        )
        test_s = time.perf_counter() - started
        record.update("metrics", metrics)

        if cfg.benchmark.enabled:
            started = time.perf_counter()
            record.update(
                "latency", [latency_row(cfg, module.to(device), device, bench_len, hf_config.vocab_size)]
            )
            record.update("timing", {"bench_s": round(time.perf_counter() - started, 3)})
        record.update("timing", {"fit_s": round(fit_s, 3), "test_s": round(test_s, 3)})
        latency = record.data["latency"][0] if record.data["latency"] else {}
        tracker.summarize({**metrics, **{f"latency/{k}": v for k, v in latency.items()}})
    return record.data


def latency_row(
    cfg: Config, module: torch.nn.Module, device: torch.device, seq_len: int, vocab_size: int
) -> dict[str, Any]:
    """One latency record: what was timed, how, and the figures."""
    precision = str(cfg.trainer.precision)
    stats = measure_forward_latency(
        module, cfg.benchmark, seq_len, device, vocab_size, autocast_dtype=_AUTOCAST.get(precision)
    )
    return {
        "variant": "fp32" if precision in ("32", "32-true") else precision,
        "backend": "torch",
        "device": device.type,
        "threads": cfg.benchmark.threads or torch.get_num_threads(),
        "seq_len": seq_len,
        "batch_size": cfg.benchmark.batch_size,
        "timer": "cuda_event" if device.type == "cuda" else "perf_counter",
        **stats.as_dict(),
    }


def _check_length(hf_config: Any, *lengths: tuple[str, int]) -> None:
    limit = max_positions(hf_config)
    for name, value in lengths:
        if limit is not None and value > limit:
            raise ConfigError(f"{name}={value} exceeds the model's position limit {limit}; use <= {limit}")
