"""Forward latency with warm-up and per-iteration timings.

Every iteration is timed on its own, so the figures carry their spread (median, p90, p99, relative
stdev) rather than one mean. CPU iterations use `time.perf_counter`; CUDA iterations use CUDA
events recorded around each forward, read once the loop is over. The host synchronises with the
device before and after the timed loop and, inside it, waits for every `CUDA_SYNC_EVERY`-th
forward's end event: without that wait the host would queue forwards far ahead of the device, and
the loop's clock (which decides when `min_duration_s` is met) would measure launches, not work.
Models compared within one process (FP32 against its INT8 form) are timed in interleaved rounds,
and their ratio is paired round by round.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

from qatflash.config import TimingConfig
from qatflash.placement import place
from qatflash.timing.host import HostLoad, HostWindow

K = TypeVar("K")
# Inside a CUDA timing loop the host waits for the device every this many forwards (see above).
CUDA_SYNC_EVERY = 64
# At least this many rounds are timed even when benchmark.max_duration_s runs out first.
MIN_ROUNDS_UNDER_CAP = 2


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

        mean = statistics.fmean(ordered)
        stdev = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
        median = statistics.median(ordered)
        return cls(
            iters=len(ordered),
            warmup=warmup,
            mean_ms=mean,
            p50_ms=median,
            p90_ms=_nearest_rank(ordered, 0.90),
            p99_ms=_nearest_rank(ordered, 0.99),
            stdev_ms=stdev,
            rel_stdev=stdev / mean if mean > 0 else 0.0,
            sequences_per_s=1000.0 * batch_size / median,
            tokens_per_s=1000.0 * batch_size * seq_len / median,
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _time_block(
    step: Callable[[], object], device: torch.device, done: Callable[[int, float], bool]
) -> list[float]:
    """Per-forward milliseconds until `done(forwards, seconds)`. CUDA: events, read after the block."""
    if device.type == "cuda":
        return _time_cuda(step, device, done)
    samples: list[float] = []
    started = time.perf_counter()
    while not done(len(samples), time.perf_counter() - started):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def _time_cuda(
    step: Callable[[], object], device: torch.device, done: Callable[[int, float], bool]
) -> list[float]:
    torch.cuda.synchronize(device)
    pairs = []
    started = time.perf_counter()
    while not done(len(pairs), time.perf_counter() - started):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        pairs.append((start, end))
        if len(pairs) % CUDA_SYNC_EVERY == 0:
            end.synchronize()  # bounds the host's lead over the device; no sync per iteration
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in pairs]


@dataclass(frozen=True)
class Contender:
    """One model timed side by side with others: where it runs, in which autocast dtype, the
    precision its latency row reports (a training precision such as 32-true, or a quantized
    format such as int8), and the dtype its float tensors compute in (a condition its latency ratio
    is paired under). `device` is the authority: the model is placed there (`qatflash.placement`)
    and its inputs moved there before it is timed, wherever an earlier stage left it."""

    model: torch.nn.Module
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    precision: str | None = None
    dtype: str = "float32"

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Autocast to `autocast_dtype` on the contender's device, or nothing when it runs as it is."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@dataclass(frozen=True)
class SideBySide:
    """One contender's figures, and the median of each of its blocks, round by round."""

    stats: LatencyStats
    block_medians_ms: list[float]
    host: HostLoad  # the load of the whole interleaved window, the same for every contender

    def ratio_to(self, reference: SideBySide) -> dict[str, float | int]:
        """This contender's latency over the reference's, paired round by round.

        Each round's ratio compares blocks timed seconds apart, so a host whose load drifts over the
        measurement (other tenants, frequency scaling) moves both sides of it alike; the median of
        the rounds is the figure, and their 10th-90th percentiles its spread.
        """
        ratios = sorted(a / b for a, b in zip(self.block_medians_ms, reference.block_medians_ms, strict=True))
        return {
            "ratio": statistics.median(ratios),
            "ratio_p10": _nearest_rank(ratios, 0.10),
            "ratio_p90": _nearest_rank(ratios, 0.90),
            "rounds": len(ratios),
        }


def token_inputs(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """Seeded random token ids of shape (batch_size, seq_len) with a full attention mask: the same
    inputs for every model a job or benchmark point times."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def measure_side_by_side(
    contenders: Mapping[K, Contender],
    cfg: TimingConfig,
    seq_len: int,
    vocab_size: int,
    make_inputs: Callable[[int, int, int], dict[str, torch.Tensor]] = token_inputs,
) -> dict[K, SideBySide]:
    """Forward latency of several models on the same inputs (a task's `timing_inputs`; random token
    ids by default), timed in interleaved rounds."""
    inputs = make_inputs(cfg.batch_size, seq_len, vocab_size)
    steps = {key: (_forward(c, inputs), c.device) for key, c in contenders.items()}
    with timing_mode(contenders, cfg):
        return time_in_rounds(steps, cfg, seq_len)


@contextlib.contextmanager
def timing_mode(contenders: Mapping[K, Contender], cfg: TimingConfig) -> Iterator[None]:
    """The contenders placed on their devices, in eval mode under inference mode, at `cfg.threads`;
    the thread count and each model's training mode are restored afterwards, whatever happens."""
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    modes = {key: c.model.training for key, c in contenders.items()}
    try:
        for c in contenders.values():
            place(c.model, c.device).eval()
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(previous_threads)
        for key, c in contenders.items():
            c.model.train(modes[key])


def time_in_rounds(
    steps: Mapping[K, tuple[Callable[[], object], torch.device]], cfg: TimingConfig, seq_len: int
) -> dict[K, SideBySide]:
    """Time several steps (each with the device it runs on) against each other in interleaved rounds.

    Timing one after another lets the host's load, which drifts over minutes on a shared machine,
    masquerade as a speed-up. Instead every round times a block of `cfg.block_iters` calls of each
    step, starting with a different step each round, until each has `min_iters` calls and
    `min_duration_s` of them. Blocks (not single calls) keep each model's weights warm in the
    caches, as they are when that model is served alone.
    """
    for step, _ in steps.values():
        for _ in range(cfg.warmup):
            step()
    samples: dict[K, list[float]] = {key: [] for key in steps}
    blocks: dict[K, list[float]] = {key: [] for key in steps}
    order = list(steps)
    window, started, rounds = HostWindow(), time.perf_counter(), 0
    while not all(_enough(times, cfg) for times in samples.values()) and not over_budget(
        cfg, time.perf_counter() - started, rounds
    ):
        rounds += 1
        for key in order:
            step, device = steps[key]
            block = _time_block(step, device, lambda count, _: count >= cfg.block_iters)
            samples[key].extend(block)
            blocks[key].append(statistics.median(block))
        order = order[1:] + order[:1]
    host = window.load()
    return {
        key: SideBySide(
            LatencyStats.from_samples(samples[key], cfg.warmup, cfg.batch_size, seq_len), blocks[key], host
        )
        for key in steps
    }


def _forward(contender: Contender, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    inputs = {name: tensor.to(contender.device) for name, tensor in inputs.items()}

    def step() -> object:
        with contender.autocast():
            return contender.model(**inputs)

    return step


def over_budget(cfg: TimingConfig, elapsed_s: float, rounds: int) -> bool:
    """Whether `benchmark.max_duration_s` has run out, once the rounds a paired ratio needs are in."""
    return (
        cfg.max_duration_s is not None and elapsed_s >= cfg.max_duration_s and rounds >= MIN_ROUNDS_UNDER_CAP
    )


def _enough(samples_ms: list[float], cfg: TimingConfig) -> bool:
    return len(samples_ms) >= cfg.min_iters and sum(samples_ms) / 1000.0 >= cfg.min_duration_s


def _nearest_rank(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile: an observed value, never an interpolation between two."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
