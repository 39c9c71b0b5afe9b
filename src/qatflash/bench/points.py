"""One benchmark point (model × attention × seq_len × batch × backend), measured in a fresh process.

A spawned process per point is what makes a sweep's figures independent of its order: the
allocator holds no blocks from an earlier, larger point (which would hide part of the peak), no
warm caches or compiled graphs carry over, and an out-of-memory kill takes down the point, not
the sweep. Out-of-memory is a result (`failed: out of memory`); any other error fails the job.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from qatflash.attention import forced_kernel
from qatflash.bench.saved_run import open_run
from qatflash.config import AttentionConfig, BenchConfig, ModelConfig, QuantConfig, TaskConfig, TimingConfig
from qatflash.job import resolve_device
from qatflash.models import build_model, declared_config, max_positions, model_on_meta
from qatflash.placement import place
from qatflash.quant import make_recipe
from qatflash.quant.artifact import serialized_bytes
from qatflash.results import FLOAT, QUANTIZED
from qatflash.tasks import TASKS
from qatflash.timing import TIMING_BACKENDS
from qatflash.timing.attention_profile import add_attention
from qatflash.timing.backends import CompiledBackend, TimingBackend
from qatflash.timing.generation import (
    Decoder,
    generate,
    generation_figures,
    generation_rounds,
    profile_decode,
)
from qatflash.timing.latency import Contender, measure_side_by_side
from qatflash.timing.memory import (
    address_space_bytes,
    exact_host_allocator,
    peak_memory,
    steady_host_allocator,
)
from qatflash.timing.profile import top_ops
from qatflash.timing.roofline import add_roofline, device_ceilings

OUT_OF_MEMORY = "out of memory"
# How allocation failures read: CUDA's OutOfMemoryError, or the CPU allocator under an address-space cap.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "bad_alloc")


@dataclass(frozen=True)
class PointJob:
    """Everything a fresh process needs to build the model and time one point (picklable)."""

    task: TaskConfig
    model: ModelConfig
    attention: AttentionConfig
    timing: TimingConfig
    sweep: BenchConfig
    quant: QuantConfig
    quant_name: str  # the quant group's choice (fp32, wo_packed_int4, ...), as rows name it
    seq_len: int
    batch_size: int
    backend: str
    seed: int

    def describe(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "backend": self.backend,
            "attention": self.attention.implementation,
            "sdpa_backend": self.attention.sdpa_backend,
            "device": self.sweep.device,
            "dtype": self.sweep.dtype,
            "artifact": self.sweep.artifact,
            "quant": self.quant_name,
            "new_tokens": self.timing.new_tokens,
            "kv_cache": self.timing.kv_cache if self.timing.new_tokens else None,
        }


# Decode steps the profiler records for a breakdown (after prefill): enough to average dispatch.
PROFILED_TOKENS = 8


def _subjects(
    job: PointJob, device: torch.device
) -> tuple[dict[str, nn.Module], PretrainedConfig, TimingBackend]:
    """The models the point times side by side, by variant, with their HF config and the backend:
    the task's model of `model` in `bench.dtype` (`float`), and with a `quant` recipe its weights
    quantized without data (`quantized`: dynamic or weight-only PTQ); or a training run's
    quantized artifact alone (`quantized`; compiled where it runs only so)."""
    backend: TimingBackend = TIMING_BACKENDS.create(job.backend)
    if job.sweep.artifact is not None:  # check_bench allows artifacts on the CPU in float32 only
        run = open_run(job.sweep.artifact)
        recipe = make_recipe(run.quant)
        backend = CompiledBackend() if recipe.compiled_only else backend
        return {QUANTIZED: run.load_quantized(recipe, job.attention)}, run.hf_config(), backend
    task = TASKS.load(job.task.name)
    hf_config = declared_config(job.model)
    dtype = getattr(torch, job.sweep.dtype)
    model = build_model(job.model, job.attention, hf_config, task.auto_model, device, dtype)
    model = place(model.to(dtype=dtype), device).eval()  # a pretrained one loads on the CPU
    subjects = {FLOAT: model}
    if job.quant.method != "none":
        recipe = make_recipe(job.quant)
        subjects[QUANTIZED] = place(recipe.convert(recipe.prepare(copy.deepcopy(model))), device)
    return subjects, hf_config, backend


def measure(job: PointJob, isolated: bool) -> list[dict[str, Any]]:
    """Build, warm up, take each model's peak memory of one forward (or generation), then time them
    side by side, under the attention's forced SDPA kernel if it has one; in this process, which is a
    fresh one of the point's own when `isolated`. One row per model; a quantized row carries its
    ratio to the float one, paired round by round, and where it is slower a profiler breakdown of
    both."""
    with forced_kernel(job.attention.sdpa_backend):
        return _measure(job, isolated)


def _measure(job: PointJob, isolated: bool) -> list[dict[str, Any]]:
    device = resolve_device("bench.device", job.sweep.device)
    # Only a fresh process may switch its allocator, and before the model exists.
    exact = isolated and device.type == "cpu" and exact_host_allocator()
    if job.timing.threads is not None:
        torch.set_num_threads(job.timing.threads)
    torch.manual_seed(job.seed)
    models, hf_config, backend = _subjects(job, device)
    task = TASKS.load(job.task.name)
    inputs = {
        k: v.to(device)
        for k, v in task.timing_inputs(job.batch_size, job.seq_len, hf_config.vocab_size).items()
    }
    models = {variant: backend.wrap(m, inputs, max_positions(hf_config)) for variant, m in models.items()}
    generating = job.timing.new_tokens > 0
    steps = {
        variant: _step(model, inputs, job.timing if generating else None) for variant, model in models.items()
    }
    contenders = {variant: Contender(model, device) for variant, model in models.items()}
    with torch.inference_mode():
        for variant, model in models.items():
            if backend.warm_at_full_size:
                steps[variant]()  # compile at this shape; compilation's own memory is not the model's
            else:  # load lazily initialised kernels and libraries, at a size that costs no memory
                model(**{k: v[:1, :8] for k, v in inputs.items()})
        # Before the memory cap: the copy and the matmul are the device's calibration, not the point's.
        ceilings = device_ceilings(contenders) if generating or backend.runs_torch else {}
        cap_memory(job.sweep.max_memory_gb, device)
        memory = {variant: peak_memory(step, device, exact) for variant, step in steps.items()}
    if exact:
        steady_host_allocator()
    timing = replace(job.timing, batch_size=job.batch_size)
    if generating:
        prompt = inputs["input_ids"].shape
        times = generation_rounds(contenders, timing, inputs["input_ids"])
        figures = {v: generation_figures(t) for v, t in times.items()}
        structure = model_on_meta(hf_config, task.auto_model)
        add_roofline(figures, contenders, ceilings, structure, hf_config, prompt, job.timing.new_tokens)
        timed = {v: t.decode for v, t in times.items()}
    else:
        timed = measure_side_by_side(
            contenders,
            timing,
            job.seq_len,
            hf_config.vocab_size,
            lambda *_: {k: v.cpu() for k, v in inputs.items()},
        )
        figures = {v: {**t.stats.as_dict(), "scenario": "forward"} for v, t in timed.items()}
    if backend.runs_torch:
        add_attention(figures, contenders, ceilings, hf_config, inputs, task.attends_causally, timing)
    rows = []
    for variant, model in models.items():
        row = {
            **job.describe(),
            "variant": variant,
            "status": "ok",
            "error": None,
            "threads": torch.get_num_threads(),
            "timer": "cuda_event" if device.type == "cuda" else "perf_counter",
            "isolated": isolated,
            "compiled": isinstance(
                backend, CompiledBackend
            ),  # pt2e artifacts run compiled whatever the backend
            "weight_bytes": serialized_bytes(model),
            **memory[variant],
            **figures[variant],
            **timed[variant].host.as_dict(),
        }
        if variant == QUANTIZED and FLOAT in timed:
            row.update({f"{k}_to_float": v for k, v in timed[QUANTIZED].ratio_to(timed[FLOAT]).items()})
            if generating:
                paired = times[QUANTIZED].prefill.ratio_to(times[FLOAT].prefill)
                row.update({f"prefill_{k}_to_float": v for k, v in paired.items()})
                if (compiled := times[QUANTIZED].compiled) and (reference := times[FLOAT].compiled):
                    paired = compiled.decode.ratio_to(reference.decode)
                    row.update({f"compiled_{k}_to_float": v for k, v in paired.items()})
        rows.append(row)
    if len(rows) == 2 and rows[1]["ratio_to_float"] > 1:
        for row, model in zip(rows, models.values(), strict=True):
            row["profile"] = _breakdown(model, inputs, job.timing, device, generating)
    return rows


def _step(
    model: nn.Module, inputs: dict[str, torch.Tensor], generation: TimingConfig | None
) -> Callable[[], object]:
    """One forward, or one whole generation (prefill + decode) when timing generation."""
    if generation is None:
        return lambda: model(**inputs)
    return lambda: generate(Decoder(model, generation.kv_cache), inputs["input_ids"], generation.new_tokens)


def _breakdown(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    timing: TimingConfig,
    device: torch.device,
    generating: bool,
) -> list[dict[str, Any]]:
    """Top ops over `PROFILED_TOKENS` decode steps after an unprofiled prefill, or over block_iters forwards."""
    if generating:
        return profile_decode(
            Decoder(model, timing.kv_cache), inputs["input_ids"], min(timing.new_tokens, PROFILED_TOKENS)
        )

    def forwards(start: Callable[[], None]) -> None:
        with torch.inference_mode():
            start()
            for _ in range(timing.block_iters):
                model(**inputs)

    return top_ops(forwards, device)


def cap_memory(max_gb: float | None, device: torch.device) -> None:
    """Hold this process to `max_gb` on `device` (`bench.max_memory_gb`): CUDA's allocator refuses
    beyond its share of the device's memory; on the CPU, the address space stops growing there."""
    if max_gb is None:
        return
    limit = int(max_gb * 2**30)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, limit / torch.cuda.get_device_properties(device).total_memory), device
        )
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes() + limit, hard))


def failed(job: PointJob, error: str) -> list[dict[str, Any]]:
    return [{**job.describe(), "status": "failed", "error": error}]


def measure_or_oom(job: PointJob, isolated: bool) -> list[dict[str, Any]]:
    """`measure`, with running out of memory recorded as the point's result."""
    try:
        return measure(job, isolated)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if not any(m in str(error) for m in _OOM_MESSAGES) and not isinstance(error, MemoryError):
            raise
        return failed(job, OUT_OF_MEMORY)


def _child(job: PointJob, send: Connection) -> None:
    try:
        send.send(("row", measure_or_oom(job, isolated=True)))
    except Exception as error:  # the parent fails the job with this message
        send.send(("error", f"{type(error).__name__}: {error}".splitlines()[0]))
    finally:
        send.close()


def run_point(job: PointJob) -> list[dict[str, Any]]:
    """The point's rows (one per model timed), measured in a fresh spawned process when `bench.isolate` (the default)."""
    if not job.sweep.isolate:
        return measure_or_oom(job, isolated=False)
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(job, send), daemon=True)
    process.start()
    send.close()
    try:
        kind, payload = receive.recv()
    except EOFError:  # died without a word: the kernel's OOM killer, or a crash
        kind, payload = "died", None
    process.join()
    if kind == "row":
        return payload
    if kind == "error":
        raise RuntimeError(f"benchmark point {job.describe()} failed: {payload}")
    if process.exitcode == -signal.SIGKILL:
        return failed(job, f"{OUT_OF_MEMORY} (killed by the OS)")
    raise RuntimeError(f"benchmark point {job.describe()} crashed (exit code {process.exitcode})")
