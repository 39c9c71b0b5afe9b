"""Forward latency with warm-up and per-iteration timings.

Every iteration is timed on its own, so the figures carry their spread (median, p90, p99, relative
stdev) rather than one mean. CPU iterations use `time.perf_counter`; CUDA iterations use CUDA
events recorded around each forward and read after one synchronisation at the end, so the host
never waits inside the timed loop.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from qatflash.config import BenchmarkConfig


@dataclass(frozen=True)
class LatencyStats:
    iters: int
    warmup: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    stdev_ms: float
    rel_stdev: float
    sequences_per_s: float
    tokens_per_s: float

    @classmethod
    def from_samples(
        cls, samples_ms: list[float], warmup: int, batch_size: int, seq_len: int
    ) -> LatencyStats:
        ordered = sorted(samples_ms)

        def pct(q: float) -> float:
            # Nearest-rank percentile: an observed time, never an interpolation between two.
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        mean = statistics.fmean(ordered)
        stdev = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
        median = statistics.median(ordered)
        return cls(
            iters=len(ordered),
            warmup=warmup,
            mean_ms=mean,
            p50_ms=median,
            p90_ms=pct(0.90),
            p99_ms=pct(0.99),
            stdev_ms=stdev,
            rel_stdev=stdev / mean if mean > 0 else 0.0,
            sequences_per_s=1000.0 * batch_size / median,
            tokens_per_s=1000.0 * batch_size * seq_len / median,
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def time_iterations(step: Callable[[], object], device: torch.device, cfg: BenchmarkConfig) -> list[float]:
    """Run `step` `cfg.warmup` times untimed, then until both `min_iters` and `min_duration_s` are met."""
    for _ in range(cfg.warmup):
        step()
    if device.type == "cuda":
        return _time_cuda(step, device, cfg)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < cfg.min_iters or time.perf_counter() - started < cfg.min_duration_s:
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def _time_cuda(step: Callable[[], object], device: torch.device, cfg: BenchmarkConfig) -> list[float]:
    torch.cuda.synchronize(device)
    pairs = []
    started = time.perf_counter()
    while len(pairs) < cfg.min_iters or time.perf_counter() - started < cfg.min_duration_s:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        pairs.append((start, end))
        if len(pairs) % 64 == 0:
            # Let the host see the elapsed time now and then without a sync per iteration.
            end.synchronize()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in pairs]


def measure_forward_latency(
    model: torch.nn.Module,
    cfg: BenchmarkConfig,
    seq_len: int,
    device: torch.device,
    vocab_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> LatencyStats:
    """Latency of one forward on random token ids of shape (batch_size, seq_len), no padding."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (cfg.batch_size, seq_len), generator=generator).to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
        ):
            samples = time_iterations(lambda: model(**inputs), device, cfg)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return LatencyStats.from_samples(samples, cfg.warmup, cfg.batch_size, seq_len)
