"""One benchmark point (model × attention × seq_len × batch × backend), measured in a fresh process.

A spawned process per point is what makes a sweep's figures independent of its order: the
allocator holds no blocks from an earlier, larger point (which would hide part of the peak), no
warm caches or compiled graphs carry over, and an out-of-memory kill takes down the point, not
the sweep. Out-of-memory is a result (`failed: out of memory`); any other error fails the job.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from qatflash.bench.saved_run import open_run
from qatflash.config import AttentionConfig, BenchConfig, ModelConfig, TaskConfig, TimingConfig
from qatflash.models import build_model, declared_config, max_positions
from qatflash.quant import make_recipe
from qatflash.tasks import TASKS
from qatflash.timing import TIMING_BACKENDS
from qatflash.timing.backends import CompiledBackend, TimingBackend
from qatflash.timing.host import HostWindow
from qatflash.timing.latency import LatencyStats, time_iterations
from qatflash.timing.memory import (
    address_space_bytes,
    exact_host_allocator,
    peak_memory,
    steady_host_allocator,
)

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
        }


def _subject(job: PointJob, device: torch.device) -> tuple[nn.Module, PretrainedConfig, TimingBackend]:
    """The model the point times, its HF config, and the backend that runs it: the task's model of
    `model` in `bench.dtype`, or a training run's INT8 artifact (compiled where it runs only so)."""
    backend: TimingBackend = TIMING_BACKENDS.create(job.backend)
    if job.sweep.artifact is None:
        task = TASKS.load(job.task.name)
        hf_config = declared_config(job.model)
        model = build_model(job.model, job.attention, hf_config, task.auto_model)
        return model.to(device=device, dtype=getattr(torch, job.sweep.dtype)).eval(), hf_config, backend
    # check_bench allows artifacts on the CPU in float32 only, their kernels' home
    run = open_run(job.sweep.artifact)
    recipe = make_recipe(run.quant)
    backend = CompiledBackend() if recipe.compiled_only else backend
    return run.load_int8(recipe, job.attention), run.hf_config(), backend


def measure(job: PointJob, isolated: bool) -> dict[str, Any]:
    """Build, warm up, take the peak memory of one forward, then time forwards; in this process, which
    is a fresh one of the point's own when `isolated`."""
    device = torch.device(job.sweep.device)
    # Only a fresh process may switch its allocator, and before the model exists.
    exact = isolated and device.type == "cpu" and exact_host_allocator()
    if job.timing.threads is not None:
        torch.set_num_threads(job.timing.threads)
    torch.manual_seed(job.seed)
    model, hf_config, backend = _subject(job, device)
    make_inputs = TASKS.load(job.task.name).timing_inputs
    inputs = {
        k: v.to(device) for k, v in make_inputs(job.batch_size, job.seq_len, hf_config.vocab_size).items()
    }
    model = backend.wrap(model, inputs, max_positions(hf_config))

    def forward() -> object:
        return model(**inputs)

    with torch.inference_mode():
        if backend.warm_at_full_size:
            forward()  # compile at this shape; compilation's own memory is not the model's
        else:  # load lazily initialised kernels and libraries, at a size that costs no memory
            model(**{k: v[:1, :8] for k, v in inputs.items()})
        _cap_memory(job.sweep.max_memory_gb, device)
        memory = peak_memory(forward, device, exact)
        if exact:
            steady_host_allocator()
        window = HostWindow()
        samples = time_iterations(forward, device, job.timing)
        host = window.load()
    stats = LatencyStats.from_samples(samples, job.timing.warmup, job.batch_size, job.seq_len)
    return {
        **job.describe(),
        "status": "ok",
        "error": None,
        "threads": torch.get_num_threads(),
        "timer": "cuda_event" if device.type == "cuda" else "perf_counter",
        "isolated": isolated,
        "compiled": isinstance(
            backend, CompiledBackend
        ),  # pt2e INT8 artifacts run compiled whatever the backend
        **memory,
        **stats.as_dict(),
        **host.as_dict(),
    }


def _cap_memory(max_gb: float | None, device: torch.device) -> None:
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


def failed(job: PointJob, error: str) -> dict[str, Any]:
    return {**job.describe(), "status": "failed", "error": error}


def measure_or_oom(job: PointJob, isolated: bool) -> dict[str, Any]:
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


def run_point(job: PointJob) -> dict[str, Any]:
    """The point's row, measured in a fresh spawned process when `bench.isolate` (the default)."""
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
