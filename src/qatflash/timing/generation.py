"""Generation timing for causal LMs: prefill, then per-token decode with the KV cache.

What a team ships an LLM on is the time to its first token at its context length (prefill: one
forward over the prompt, which fills the cache) and the latency of each generated token after it
(decode: one token in, reading every cached key and value). One forward's time answers neither.
A generation here is greedy: prefill, then `new_tokens` decode steps, each timed on its own, so
decode carries its spread per token. Decode keeps its keys and values in transformers'
DynamicCache (grown per token), a StaticCache preallocated to the whole generation, or none
(every step re-runs the whole sequence: the baseline that shows what the cache buys).

Eager decode measures Python as much as the device: a batch-1 step of a small model costs the same
at every context, and on a GPU the kernel launches outlast the weights' reads. Compiled decode
(`benchmark.decode=compiled`) runs every decode step through one `torch.compile(fullgraph=True)`
graph over a StaticCache allocated once per model (CUDA graphs on CUDA: mode "reduce-overhead"), and is
timed in the same rounds as the eager decode of the same model, so each row carries both and their
ratio. Prefill runs eager in both.

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
from torch._dynamo.utils import counters
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache

from qatflash.config import TimingConfig
from qatflash.errors import ConfigError, first_line
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


def _last_only(model: nn.Module) -> dict[str, int]:
    """Ask for the last position's logits only, as transformers' own generate does: a prompt's full
    (tokens x vocabulary) logits would dominate prefill's memory (131 MB at 1k tokens, 32k vocab)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class Decoder:
    """Decode through the model's own forward, on a fresh cache of `kv_cache` per generation."""

    def __init__(self, model: nn.Module, kv_cache: str) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.last_only = _last_only(model)

    def new_cache(self, max_len: int) -> Cache | None:
        return new_cache(self.model, self.kv_cache, max_len)

    def forward(self, ids: torch.Tensor, cache: Cache | None, position: torch.Tensor) -> torch.Tensor:
        """The last position's logits of `ids`, which sit at `position` (their cache positions)."""
        out = self.model(
            input_ids=ids,
            past_key_values=cache,
            use_cache=cache is not None,
            cache_position=position if cache is not None else None,
            **self.last_only,
        )
        return out.logits[:, -1]

    def step(self, ids: torch.Tensor, cache: Cache | None, position: torch.Tensor) -> torch.Tensor:
        """One decode step's logits."""
        return self.forward(ids, cache, position)


class CompiledDecoder(Decoder):
    """Decode steps through one `torch.compile(fullgraph=True)` graph over one StaticCache that every
    generation resets: a new cache per generation would be new static addresses, and so a new graph.
    Decode's shapes never change (one token in, a cache of fixed size, its position a tensor), so it
    compiles once; CUDA graphs replay the step's kernels without a launch each on CUDA."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__(model, "static")
        self.cache: StaticCache | None = None
        self.max_len = 0
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.compiled = torch.compile(self.forward, fullgraph=True, mode=mode)

    def new_cache(self, max_len: int) -> Cache:
        if self.cache is None:
            self.cache, self.max_len = StaticCache(config=self.model.config, max_cache_len=max_len), max_len
        elif self.max_len != max_len:
            raise ValueError(f"compiled decode holds a cache of {self.max_len} tokens, not {max_len}")
        self.cache.reset()
        return self.cache

    def step(self, ids: torch.Tensor, cache: Cache | None, position: torch.Tensor) -> torch.Tensor:
        try:
            logits = self.compiled(ids, cache, position)
        except torch._dynamo.exc.TorchDynamoException as error:  # a graph break, under fullgraph
            raise ConfigError(
                f"benchmark.decode=compiled: {type(self.model).__name__}'s decode step does not compile into "
                f"one graph ({first_line(error)}); use benchmark.decode=eager"
            ) from error
        # CUDA graphs overwrite a replay's outputs at the next one; the logits are kept beyond it
        return logits.clone()


def decoder(model: nn.Module, kv_cache: str, mode: str, device: torch.device) -> Decoder:
    """How `model` decodes in `mode` (config.DECODE_MODES: eager, compiled)."""
    return CompiledDecoder(model, device) if mode == "compiled" else Decoder(model, kv_cache)


def generate(
    decode: Decoder,
    input_ids: torch.Tensor,
    new_tokens: int,
    timer: StepTimer = _untimed,
) -> GenerationRun:
    """Prefill `input_ids` (eager), then `new_tokens` greedy decode steps; `timer(phase, step)` runs
    each step (phase "prefill" or "decode") and may time it. Run under inference mode by the caller."""
    # prefill writes the prompt, each decode step one token: the last chosen token is never fed
    prompt = input_ids.shape[1]
    cache = decode.new_cache(prompt + new_tokens)
    sequence = input_ids
    positions = torch.arange(prompt + new_tokens, device=input_ids.device)
    logits = [timer("prefill", lambda: decode.forward(input_ids, cache, positions[:prompt]))]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    for step in range(new_tokens):
        sequence = torch.cat([sequence, tokens[-1]], dim=1)
        fed = tokens[-1] if cache is not None else sequence
        position = positions[prompt + step : prompt + step + 1]
        logits.append(timer("decode", lambda fed=fed, position=position: decode.step(fed, cache, position)))
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return GenerationRun(torch.cat(tokens, dim=1), logits, cache)


def profile_decode(decode: Decoder, input_ids: torch.Tensor, new_tokens: int) -> list[dict[str, Any]]:
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
            generate(decode, input_ids, new_tokens, timer)

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
class CompiledTimes:
    """A model's compiled decode per token (its round medians for pairing), its ratio to the same
    model's eager decode in the same rounds, and the graphs dynamo built: at warm-up (1 when decode
    compiles once) and while timed (0: a recompilation would be timed as decode)."""

    decode: SideBySide
    ratio_to_eager: dict[str, float | int]
    graphs: int
    graphs_while_timed: int


@dataclass(frozen=True)
class GenerationTimes:
    """One model's generation figures: prefill per generation, eager decode per token (each with
    its round medians, for pairing), compiled decode's where asked for, and the KV cache's bytes at
    the end of a generation."""

    prefill: SideBySide
    decode: SideBySide
    compiled: CompiledTimes | None
    kv_cache_bytes: int


def _timed_generation(
    contender: Contender, decode: Decoder, input_ids: torch.Tensor, new_tokens: int
) -> tuple[dict[str, list[float]], int]:
    clock = _PhaseClock(contender.device)
    with contender.autocast():
        run = generate(decode, input_ids, new_tokens, clock)
    return clock.samples(), kv_cache_bytes(run.cache)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its `unique_graphs` counter)."""
    return int(counters["stats"]["unique_graphs"])


def generation_rounds(
    contenders: Mapping[K, Contender], cfg: TimingConfig, input_ids: torch.Tensor
) -> dict[K, GenerationTimes]:
    """Time whole generations of several models in interleaved rounds (each round starting with a
    different model), after one untimed generation each (it loads kernels, allocates the cache at
    every shape the rounds use and compiles a compiled decode). Under `decode=compiled` each round
    runs each model's eager and compiled generation. Rounds go on until every model has `min_iters`
    generations and `min_duration_s` of them, or `max_duration_s` has passed (after at least 2 rounds)."""
    batch = input_ids.shape[0]
    modes = ["eager", "compiled"] if cfg.decode == "compiled" else ["eager"]
    runs = [(key, mode) for key in contenders for mode in modes]
    inputs = {key: input_ids.to(c.device) for key, c in contenders.items()}
    decoders = {(k, m): decoder(contenders[k].model, cfg.kv_cache, m, contenders[k].device) for k, m in runs}
    graphs = dict.fromkeys(runs, 0)
    with timing_mode(contenders, cfg):
        for key, mode in runs:
            before = compiled_graphs()
            _timed_generation(contenders[key], decoders[key, mode], inputs[key], cfg.new_tokens)
            graphs[key, mode] = compiled_graphs() - before
        warm = compiled_graphs()
        samples = {run: {"prefill": [], "decode": []} for run in runs}
        blocks = {run: {"prefill": [], "decode": []} for run in runs}
        cache_bytes = dict.fromkeys(contenders, 0)
        order, window, started = list(runs), HostWindow(), time.perf_counter()
        while not _enough(samples, cfg) and not over_budget(
            cfg, time.perf_counter() - started, len(blocks[order[0]]["prefill"])
        ):
            for key, mode in order:
                timed, cache_bytes[key] = _timed_generation(
                    contenders[key], decoders[key, mode], inputs[key], cfg.new_tokens
                )
                for phase, values in timed.items():
                    samples[key, mode][phase].extend(values)
                    blocks[key, mode][phase].append(statistics.median(values))
            order = order[1:] + order[:1]
        host = window.load()
        recompiled = compiled_graphs() - warm

    def side_by_side(run: tuple[K, str], phase: str, tokens: int) -> SideBySide:
        stats = LatencyStats.from_samples(samples[run][phase], 1, batch, tokens)
        return SideBySide(stats, blocks[run][phase], host)

    def compiled(key: K) -> CompiledTimes | None:
        if "compiled" not in modes:
            return None
        decode = side_by_side((key, "compiled"), "decode", 1)
        eager = side_by_side((key, "eager"), "decode", 1)
        return CompiledTimes(decode, decode.ratio_to(eager), graphs[key, "compiled"], recompiled)

    return {
        key: GenerationTimes(
            side_by_side((key, "eager"), "prefill", input_ids.shape[1]),
            side_by_side((key, "eager"), "decode", 1),
            compiled(key),
            cache_bytes[key],
        )
        for key in contenders
    }


def generation_figures(times: GenerationTimes) -> dict[str, Any]:
    """A latency row's figures for a generation: eager decode per token as the row's own (p50_ms is
    ms per generated token, tokens_per_s generated tokens per second), prefill's beside them under
    `prefill_`, compiled decode's under `compiled_` (with its ratio to eager decode and the graphs
    it compiled), and the KV cache's bytes."""
    prefill = {f"prefill_{k}": v for k, v in _phase_figures(times.prefill.stats).items()}
    compiled: dict[str, Any] = {"decode": "eager"}
    if times.compiled is not None:
        c = times.compiled
        compiled = {
            "decode": "eager+compiled",
            **{f"compiled_{k}": v for k, v in _phase_figures(c.decode.stats).items()},
            **{f"compiled_{k}_to_eager": v for k, v in c.ratio_to_eager.items()},
            "compiled_graphs": c.graphs,
            "compiled_graphs_while_timed": c.graphs_while_timed,
        }
    return {
        **times.decode.stats.as_dict(),
        **prefill,
        **compiled,
        "kv_cache_bytes": times.kv_cache_bytes,
        "scenario": "generate",
    }


def _phase_figures(stats: LatencyStats) -> dict[str, Any]:
    """A phase's figures under a prefix, without what its row already says (warm-up, sequences per second)."""
    return {k: v for k, v in stats.as_dict().items() if k not in ("warmup", "sequences_per_s")}


def _enough(samples: Mapping[Any, dict[str, list[float]]], cfg: TimingConfig) -> bool:
    """Every model has min_iters generations, and min_duration_s of timed steps."""
    return all(
        len(s["prefill"]) >= cfg.min_iters
        and (sum(s["prefill"]) + sum(s["decode"])) / 1000.0 >= cfg.min_duration_s
        for s in samples.values()
    )
