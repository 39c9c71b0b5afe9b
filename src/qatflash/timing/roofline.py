"""How close a generation's figures come to what the device allows, measured in the same process.

A batch-1 decode step reads every weight once and the keys and values it attends to, and does
little arithmetic: its ceiling is memory bandwidth. A prefill multiplies every weight by every
prompt token: its ceiling is matmul throughput. A decode figure means little without the bytes it
moved per token, and a prefill figure without its FLOPs; both mean more beside what this device did
just before in the same process: a device-to-device copy (bytes read + written per second) and a
large matmul (bfloat16 on CUDA, float32 on the CPU). Quantized weights count at their stored size
(packed values and their scales), which is what a weight-only scheme saves.

Counted as: weights, every state_dict tensor once (a tied head's table once; the input embedding
as the rows a step looks up, not its table); keys and values, those of the positions a step attends
to, at the mean context of the generation's decode steps (a static cache's kernels may read its whole
preallocation: more than counted). FLOPs: 2 per multiply-add of every Linear (and GPT-2 Conv1D) over
every prompt token, the LM head over the last token only (a generation asks for its logits alone),
plus attention's QK^T and PV, 2 x 2 x layers x heads x head_dim x tokens^2 / 2 (causal: half).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from qatflash.timing.latency import Contender

K = TypeVar("K")

# The measured ceilings' sizes: large enough to leave the caches (a 1 GiB copy, an 8k^3 matmul on
# CUDA), small enough for a 2-core host to measure in well under a second (256 MiB, 1k^3).
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}
MATMUL_N = {"cuda": 8192, "cpu": 1024}
MATMUL_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
REPEATS = 5


@dataclass(frozen=True)
class Ceilings:
    """What this device did in this process: a copy's bandwidth (read + written bytes per second)
    and a square matmul's throughput, with their sizes and dtype."""

    copy_gb_per_s: float
    copy_bytes: int
    matmul_tflops: float
    matmul_n: int
    matmul_dtype: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median_ms(step: Callable[[], object], device: torch.device) -> float:
    """The median of `REPEATS` timed calls after one untimed one, in milliseconds."""
    step()
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _copy_ms(device: torch.device, size: int) -> float:
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return _median_ms(lambda: target.copy_(source), device)


def _matmul_ms(device: torch.device, n: int, dtype: torch.dtype) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return _median_ms(lambda: a @ b, device)


def measure_ceilings(device: torch.device) -> Ceilings | None:
    """Time a device-to-device copy and a square matmul on `device`, at the current thread count
    (None on a device other than the CPU and CUDA: no sizes chosen for it)."""
    if device.type not in COPY_BYTES:
        return None
    size, n, dtype = COPY_BYTES[device.type], MATMUL_N[device.type], MATMUL_DTYPE[device.type]
    with torch.inference_mode():
        copy_ms, matmul_ms = _copy_ms(device, size), _matmul_ms(device, n, dtype)
    if device.type == "cuda":  # the calibration's buffers go back: a memory cap set next counts the cache
        torch.cuda.empty_cache()
    return Ceilings(
        copy_gb_per_s=2 * size / copy_ms / 1e6,
        copy_bytes=size,
        matmul_tflops=2 * n**3 / matmul_ms / 1e9,
        matmul_n=n,
        matmul_dtype=str(dtype).removeprefix("torch."),
    )


def stored_bytes(value: object) -> int:
    """Bytes a state_dict value holds: a tensor's elements, a tensor subclass's inner tensors (torchao's
    packed values and scales), a quantized tensor's values and per-channel scales, a tuple's parts."""
    if isinstance(value, list | tuple):
        return sum(stored_bytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return sum(stored_bytes(getattr(value, name)) for name in names)
    if value.is_quantized and value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return value.numel() * value.element_size() + stored_bytes(
            (value.q_per_channel_scales(), value.q_per_channel_zero_points())
        )
    return value.numel() * value.element_size()


def weights_read_per_token(model: nn.Module, batch: int) -> int:
    """Bytes of weights one decode step reads: every state_dict tensor once, the input embedding as
    the `batch` rows it looks up unless the LM head reads the same table whole (tied). An embedding
    a recipe quantized into a module of its own counts whole (an overcount of its table less a row)."""
    seen: set[int] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        if isinstance(value, torch.Tensor) and id(value) in seen:
            continue
        seen.add(id(value))
        total += stored_bytes(value)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(head, "weight", None) is embedding.weight if embedding is not None else False
    if isinstance(embedding, nn.Embedding) and not tied:
        table = stored_bytes(embedding.weight)
        total -= table - batch * table // embedding.num_embeddings
    return total


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def prefill_flops(model: nn.Module, config: PretrainedConfig, batch: int, tokens: int) -> int:
    """FLOPs of a prompt's forward: every Linear over every token (the LM head over the last one),
    and causal attention's two products over half the token pairs. `model` is the float model's
    structure (`models.model_on_meta`): a quantized model may have replaced its Linears."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    flops = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | Conv1D):
            weights = module.weight.shape[0] * module.weight.shape[1]
            flops += 2 * batch * weights * (1 if module is head else tokens)
    return flops + attention_flops(config, batch, tokens, causal=True)


def attention_flops(config: PretrainedConfig, batch: int, tokens: int, causal: bool) -> int:
    """FLOPs of attention's two products (QK^T and PV) in every layer: 2 per multiply-add over each
    head's head_dim, for every pair of tokens attended (half of them when causal)."""
    per_pair = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * _head_dim(config)
    return per_pair * batch * tokens * tokens // (2 if causal else 1)


def decode_context(prompt: int, new_tokens: int) -> float:
    """The mean number of positions a decode step attends to: step i (from 0) feeds position
    prompt + i and attends to prompt + i + 1 of them."""
    return prompt + (new_tokens + 1) / 2


def _bandwidth(prefix: str, bytes_per_token: int, p50_ms: float, ceilings: Ceilings) -> dict[str, float]:
    """A decode's achieved bandwidth (bytes per token over its median time) and its share of the copy's."""
    achieved = bytes_per_token / p50_ms / 1e6
    return {f"{prefix}gb_per_s": achieved, f"{prefix}bandwidth_share": achieved / ceilings.copy_gb_per_s}


def generation_roofline(
    model: nn.Module,
    flops: int,
    prompt: torch.Size,
    new_tokens: int,
    figures: dict[str, Any],
    ceilings: Ceilings,
) -> dict[str, Any]:
    """A generation row's bytes per decode token and its prefill's `flops` (`prefill_flops` of the
    prompt, batch x tokens), each against this process's ceilings. The KV cache's bytes per position
    come from the cache the generation filled (`kv_cache_bytes`, in whatever dtype the model wrote)."""
    batch, tokens = prompt
    weights = weights_read_per_token(model, batch)
    kv = int(figures["kv_cache_bytes"] / (tokens + new_tokens) * decode_context(tokens, new_tokens))
    prefill_tflops = flops / figures["prefill_p50_ms"] / 1e9
    out = {
        **ceilings.as_dict(),
        "weights_read_bytes": weights,
        "kv_read_bytes": kv,
        "bytes_per_token": weights + kv,
        **_bandwidth("decode_", weights + kv, figures["p50_ms"], ceilings),
        "prefill_flops": flops,
        "prefill_tflops": prefill_tflops,
        "prefill_flops_share": prefill_tflops / ceilings.matmul_tflops,
    }
    if "compiled_p50_ms" in figures:
        out.update(_bandwidth("compiled_", weights + kv, figures["compiled_p50_ms"], ceilings))
    return out


def device_ceilings(contenders: Mapping[K, Contender]) -> dict[torch.device, Ceilings | None]:
    """Each contender device's ceilings, measured once (None for a device without sizes)."""
    return {device: measure_ceilings(device) for device in {c.device for c in contenders.values()}}


def add_roofline(
    figures: Mapping[K, dict[str, Any]],
    contenders: Mapping[K, Contender],
    ceilings: Mapping[torch.device, Ceilings | None],
    float_structure: nn.Module,
    config: PretrainedConfig,
    prompt: torch.Size,
    new_tokens: int,
) -> None:
    """Add every generation row's figures against the ceilings of its contender's device
    (`device_ceilings`). `float_structure`: the float model's modules (`models.model_on_meta`),
    what prefill's FLOPs are counted on."""
    flops = prefill_flops(float_structure, config, *prompt)
    for key, contender in contenders.items():
        if (measured := ceilings[contender.device]) is not None:
            figures[key].update(
                generation_roofline(contender.model, flops, prompt, new_tokens, figures[key], measured)
            )
