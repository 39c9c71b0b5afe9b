"""Generation timing for causal LMs: prefill, then per-token decode with the KV cache.

What a team ships an LLM on is the time to its first token at its context length (prefill: one
forward over the prompt, which fills the cache) and the latency of each generated token after it
(decode: one token in, reading every cached key and value). One forward's time answers neither.
A generation here is greedy: prefill, then `new_tokens` decode steps, each timed on its own, so
decode carries its spread per token. Decode keeps its keys and values in transformers'
DynamicCache (grown per token), a StaticCache preallocated to the whole generation, or none
(every step re-runs the whole sequence: the baseline that shows what the cache buys).

Several models are timed in interleaved rounds, one whole generation each per round, and their
prefill and decode ratios are paired round by round (`SideBySide.ratio_to`), as forwards are.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache

from qatflash.config import TimingConfig
from qatflash.timing.host import HostWindow
from qatflash.timing.latency import Contender, LatencyStats, SideBySide, over_budget, timing_mode
from qatflash.timing.profile import top_ops

K = TypeVar("K")


def new_cache(model: nn.Module, kind: str, max_len: int) -> Cache | None:
    """An empty KV cache of `kind` (config.KV_CACHES) for a generation of `max_len` tokens in all."""
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return None


def kv_cache_bytes(cache: Cache | None) -> int:
    """Bytes the cache holds: every layer's keys and values (a static cache's whole preallocation)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", [])
    return sum(t.nbytes for layer in layers for t in (layer.keys, layer.values) if t is not None)


@dataclass(frozen=True)
class GenerationRun:
    """One greedy generation: the new tokens, the logits each was chosen from, and the cache after."""

    tokens: torch.Tensor  # (batch, new_tokens + 1): prefill's token, then one per decode step
    logits: list[torch.Tensor]  # the last position's logits of prefill and of every decode step
    cache: Cache | None


StepTimer = Callable[[str, Callable[[], torch.Tensor]], torch.Tensor]


def _untimed(phase: str, step: Callable[[], torch.Tensor]) -> torch.Tensor:
    return step()


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    kv_cache: str,
    timer: StepTimer = _untimed,
) -> GenerationRun:
    """Prefill `input_ids`, then `new_tokens` greedy decode steps; `timer(phase, step)` runs each
    step (phase "prefill" or "decode") and may time it. Run under inference mode by the caller."""
    # prefill writes the prompt, each decode step one token: the last chosen token is never fed
    cache = new_cache(model, kv_cache, input_ids.shape[1] + new_tokens)
    use_cache = cache is not None
    sequence = input_ids
    # Only the last position's logits, as transformers' own generate asks for: a prompt's full
    # (tokens x vocabulary) logits would dominate prefill's memory (131 MB at 1k tokens, 32k vocab).
    last_only = (
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, past_key_values=cache, use_cache=use_cache, **last_only).logits[:, -1]

    logits = [timer("prefill", lambda: forward(input_ids))]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens):
        sequence = torch.cat([sequence, tokens[-1]], dim=1)
        fed = tokens[-1] if use_cache else sequence
        logits.append(timer("decode", lambda fed=fed: forward(fed)))
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return GenerationRun(torch.cat(tokens, dim=1), logits, cache)


def profile_decode(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int, kv_cache: str
) -> list[dict[str, Any]]:
    """torch.profiler's top operators over `new_tokens` decode steps of one generation; its prefill
    runs before the profiler starts, so that a decode breakdown is not a prefill one."""
    device = input_ids.device

    def run(start: Callable[[], None]) -> None:
        def timer(phase: str, step: Callable[[], torch.Tensor]) -> torch.Tensor:
            if phase == "decode" and not started:
                started.append(start())
            return step()

        started: list[None] = []
        with torch.inference_mode():
            generate(model, input_ids, new_tokens, kv_cache, timer)

    return top_ops(run, device)


def full_sequence_logits(model: nn.Module, input_ids: torch.Tensor, run: GenerationRun) -> torch.Tensor:
    """The logits one forward over prompt + generated tokens (no cache) gives at each position a
    generation step predicted from: what cached decode must reproduce."""
    sequence = torch.cat([input_ids, run.tokens[:, :-1]], dim=1)
    logits = model(input_ids=sequence, use_cache=False).logits
    return logits[:, input_ids.shape[1] - 1 :]


class _PhaseClock:
    """Times each step of a generation in milliseconds: perf_counter on the CPU; on CUDA, events
    recorded around each step and read once the generation is over (one sync per generation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu: dict[str, list[float]] = {"prefill": [], "decode": []}
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {
            "prefill": [],
            "decode": [],
        }

    def __call__(self, phase: str, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            self.events[phase].append((start, end))
            return out
        t0 = time.perf_counter()
        out = step()
        self.cpu[phase].append((time.perf_counter() - t0) * 1000.0)
        return out

    def samples(self) -> dict[str, list[float]]:
        if self.device.type != "cuda":
            return self.cpu
        torch.cuda.synchronize(self.device)
        return {phase: [s.elapsed_time(e) for s, e in pairs] for phase, pairs in self.events.items()}


@dataclass(frozen=True)
class GenerationTimes:
    """One model's generation figures: prefill per generation, decode per token (each with its
    round medians, for pairing), and the KV cache's bytes at the end of a generation."""

    prefill: SideBySide
    decode: SideBySide
    kv_cache_bytes: int


def _timed_generation(
    contender: Contender, input_ids: torch.Tensor, cfg: TimingConfig
) -> tuple[dict[str, list[float]], int]:
    clock = _PhaseClock(contender.device)
    with contender.autocast():
        run = generate(contender.model, input_ids, cfg.new_tokens, cfg.kv_cache, clock)
    return clock.samples(), kv_cache_bytes(run.cache)


def generation_rounds(
    contenders: Mapping[K, Contender], cfg: TimingConfig, input_ids: torch.Tensor
) -> dict[K, GenerationTimes]:
    """Time whole generations of several models in interleaved rounds (each round starting with a
    different model), after one untimed generation each (it loads kernels and allocates the cache
    at every shape the rounds use). Rounds go on until every model has `min_iters` generations and
    `min_duration_s` of them, or `max_duration_s` has passed (after at least 2 rounds)."""
    batch = input_ids.shape[0]
    inputs = {key: input_ids.to(c.device) for key, c in contenders.items()}
    with timing_mode(contenders, cfg):
        for key, c in contenders.items():
            _timed_generation(c, inputs[key], cfg)
        samples = {key: {"prefill": [], "decode": []} for key in contenders}
        blocks = {key: {"prefill": [], "decode": []} for key in contenders}
        cache_bytes = dict.fromkeys(contenders, 0)
        order, window, started = list(contenders), HostWindow(), time.perf_counter()
        while not _enough(samples, cfg) and not over_budget(
            cfg, time.perf_counter() - started, len(blocks[order[0]]["prefill"])
        ):
            for key in order:
                timed, cache_bytes[key] = _timed_generation(contenders[key], inputs[key], cfg)
                for phase, values in timed.items():
                    samples[key][phase].extend(values)
                    blocks[key][phase].append(statistics.median(values))
            order = order[1:] + order[:1]
        host = window.load()
    seq_len = input_ids.shape[1]
    return {
        key: GenerationTimes(
            SideBySide(
                LatencyStats.from_samples(samples[key]["prefill"], 1, batch, seq_len),
                blocks[key]["prefill"],
                host,
            ),
            SideBySide(
                LatencyStats.from_samples(samples[key]["decode"], 1, batch, 1), blocks[key]["decode"], host
            ),
            cache_bytes[key],
        )
        for key in contenders
    }


def generation_figures(times: GenerationTimes) -> dict[str, Any]:
    """A latency row's figures for a generation: decode per token as the row's own (p50_ms is ms
    per generated token, tokens_per_s generated tokens per second), prefill's beside them under
    `prefill_`, and the KV cache's bytes."""
    prefill = {
        f"prefill_{k}": v
        for k, v in times.prefill.stats.as_dict().items()
        if k not in ("warmup", "sequences_per_s")
    }
    return {
        **times.decode.stats.as_dict(),
        **prefill,
        "kv_cache_bytes": times.kv_cache_bytes,
        "scenario": "generate",
    }


def _enough(samples: Mapping[K, dict[str, list[float]]], cfg: TimingConfig) -> bool:
    """Every model has min_iters generations, and min_duration_s of timed steps."""
    return all(
        len(s["prefill"]) >= cfg.min_iters
        and (sum(s["prefill"]) + sum(s["decode"])) / 1000.0 >= cfg.min_duration_s
        for s in samples.values()
    )
