"""Which attention kernel a timed model ran, how long it took, and its throughput.

`attention=sdpa` leaves the kernel to PyTorch (cuDNN at head size 128 on Hopper, flash elsewhere,
math where neither takes the call), and a forced one (`attention.sdpa_backend`) is a request that a
code path may bypass: a row names the kernel only as the profiler saw it. One forward of the model
as it was timed is profiled, with a range around each attention module and around each of that
module's children (its projections); what ran inside the first and outside the second is the
attention core: the kernel, rotary embedding, reshapes, and for eager attention its matmuls, mask
and softmax. Its time is kernels' device time on CUDA, host time on the CPU.

FLOPs: QK^T and PV, 2 x 2 x layers x heads x head_dim x batch x the token pairs attended (half of
tokens^2 when causal), set against the matmul this process measured (`roofline.Ceilings`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import PretrainedConfig

from qatflash.config import TimingConfig
from qatflash.timing.latency import Contender, timing_mode
from qatflash.timing.roofline import Ceilings, attention_flops

K = TypeVar("K")

# A profiler event's name (a substring of it) and the kernel it shows ran; the first that matches
# any event inside the attention wins. Dispatched SDPA operators come first (their names are the
# kernel's, stable across releases; the names are config.SDPA_KERNELS'), then what has no such
# operator: the flash-attn package's op, flex_attention's Triton template kernel on CUDA, an
# Inductor graph (flex_attention on the CPU), and eager attention's unfused softmax.
ATTENTION_KERNELS: tuple[tuple[str, str], ...] = (
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_flash_attention", "flash"),  # and its _for_cpu
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_attention_math", "math"),
    ("flash_attn::", "flash_attn_package"),
    ("triton_tem_fused", "flex_triton"),
    ("CompiledFxGraph", "inductor_graph"),
    ("aten::_softmax", "eager"),
)
UNRECOGNIZED = "unrecognized"
_FORWARD_RANGE = "qatflash::forward"
_ATTENTION_RANGE = "qatflash::attention"
_CHILD_RANGE = "qatflash::attention_child"
# How many of the costliest events inside the attention a row lists, as evidence; name length kept.
EVIDENCE = 3
EVIDENCE_NAME_CHARS = 120


@dataclass(frozen=True)
class AttentionProfile:
    """What one profiled forward showed: the kernel (an `ATTENTION_KERNELS` name or `UNRECOGNIZED`),
    the event that named it, the costliest events inside the attention (ms per forward), and the
    attention core's time per forward (None where no attention module could be delimited: a
    compiled model, whose modules run as one graph, or a family whose attention class is not
    named *Attention)."""

    kernel: str
    event: str | None
    costliest: dict[str, float]
    core_ms: float | None
    forward_ms: float  # the profiled forward's own time, measured as the core's (profiler overhead alike)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The innermost modules whose class name ends in "Attention" (LlamaAttention, GPT2Attention,
    BertSelfAttention rather than the BertAttention that holds it and its output projection)."""
    named = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    return [m for m in named if not any(inner is not m for inner in named if _holds(m, inner))]


def _holds(outer: nn.Module, inner: nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


@contextmanager
def _ranges(modules: list[nn.Module]) -> Iterator[None]:
    """A profiler range around each of `modules`' forwards and around each of their children's."""
    handles = []
    for module in modules:
        handles += _range_hooks(module, _ATTENTION_RANGE)
        for child in module.children():
            handles += _range_hooks(child, _CHILD_RANGE)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _range_hooks(module: nn.Module, name: str) -> list[torch.utils.hooks.RemovableHandle]:
    opened: list[record_function] = []

    def enter(*_: object) -> None:
        opened.append(record_function(name).__enter__())

    def leave(*_: object) -> None:
        opened.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _inside(event: FunctionEvent) -> Iterator[FunctionEvent]:
    """The host events under an attention range, leaving out its children's ranges."""
    for child in event.cpu_children:
        if child.name != _CHILD_RANGE:
            yield child
            yield from _inside(child)


def _children_ranges(event: FunctionEvent) -> Iterator[FunctionEvent]:
    for child in event.cpu_children:
        if child.name == _CHILD_RANGE:
            yield child
        else:
            yield from _children_ranges(child)


def kernel_of(names: list[str]) -> tuple[str, str | None]:
    """The kernel `names` (profiler events' names) show ran, and the name that shows it."""
    for pattern, kernel in ATTENTION_KERNELS:
        for name in names:
            if pattern in name:
                return kernel, name
    return UNRECOGNIZED, None


def profile_attention(contender: Contender, inputs: Mapping[str, torch.Tensor]) -> AttentionProfile:
    """Profile one forward of `contender`'s model on `inputs` (placed on its device, under its
    autocast), as it was timed: under the caller's forced SDPA kernel, if any, and under
    `latency.timing_mode` (eval and inference mode, the timing's threads), as `add_attention` calls it."""
    model, device = contender.model, contender.device
    # In training mode (where a fit leaves a model) dropout runs, and SDPA takes the math kernel on
    # a CPU where the timed forward took flash: the profile would describe another forward.
    assert not model.training and torch.is_inference_mode_enabled(), "profile under timing_mode"
    on_cuda = device.type == "cuda"
    compiled = any(isinstance(module, OptimizedModule) for module in model.modules())
    modules = [] if compiled else attention_modules(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    placed = {k: v.to(device) for k, v in inputs.items()}
    with (
        contender.autocast(),
        _ranges(modules),
        profile(activities=activities) as prof,
        record_function(_FORWARD_RANGE),
    ):
        model(**placed)
    events = list(prof.events())
    (forward,) = [e for e in events if e.name == _FORWARD_RANGE]
    attention = [e for e in events if e.name == _ATTENTION_RANGE]
    inside = [inner for e in attention for inner in _inside(e)] if attention else events
    kernel, event = kernel_of([e.name for e in inside])
    return AttentionProfile(
        kernel=kernel,
        event=event[:EVIDENCE_NAME_CHARS] if event else None,
        costliest=_costliest(inside, on_cuda),
        core_ms=_core_ms(attention, on_cuda) if attention else None,
        forward_ms=_total_us(forward, on_cuda) / 1000.0,
    )


def _total_us(event: FunctionEvent, on_cuda: bool) -> float:
    return event.device_time_total if on_cuda else event.cpu_time_total


def _core_ms(attention: list[FunctionEvent], on_cuda: bool) -> float:
    """Time in the attention ranges less their children's ranges, in milliseconds."""
    inside = sum(_total_us(e, on_cuda) for e in attention)
    children = sum(_total_us(c, on_cuda) for e in attention for c in _children_ranges(e))
    return (inside - children) / 1000.0


def _costliest(inside: list[FunctionEvent], on_cuda: bool) -> dict[str, float]:
    """The `EVIDENCE` costliest names inside the attention: device kernels by their time on CUDA,
    host operators by their self time on the CPU; milliseconds."""
    spent: dict[str, float] = {}
    for event in inside:
        if on_cuda:
            for kernel in event.kernels:
                name = kernel.name[:EVIDENCE_NAME_CHARS]
                spent[name] = spent.get(name, 0.0) + kernel.duration / 1000.0
        else:
            spent[event.name] = spent.get(event.name, 0.0) + event.self_cpu_time_total / 1000.0
    ranked = sorted(spent.items(), key=lambda item: item[1], reverse=True)[:EVIDENCE]
    return {name: round(ms, 4) for name, ms in ranked}


def attention_figures(found: AttentionProfile, flops: int, ceilings: Ceilings | None) -> dict[str, Any]:
    """A row's attention fields: the kernel and its evidence, the core's time and TFLOP/s, and
    their share of the measured matmul's (where this device has ceilings)."""
    row: dict[str, Any] = {
        "attention_kernel": found.kernel,
        "attention_kernel_event": found.event,
        "attention_costliest_ms": found.costliest,
        "attention_ms": found.core_ms,
        "attention_flops": flops,
    }
    if found.core_ms:
        tflops = flops / found.core_ms / 1e9
        row["attention_share_of_forward"] = found.core_ms / found.forward_ms
        row["attention_tflops"] = tflops
        if ceilings is not None:
            row.update(ceilings.as_dict())
            row["attention_flops_share"] = tflops / ceilings.matmul_tflops
    return row


def add_attention(
    figures: Mapping[K, dict[str, Any]],
    contenders: Mapping[K, Contender],
    ceilings: Mapping[torch.device, Ceilings | None],
    config: PretrainedConfig,
    inputs: Mapping[str, torch.Tensor],
    causal: bool,
    timing: TimingConfig,
) -> None:
    """Add each contender's attention fields to its row: one profiled forward on `inputs` (the
    timed batch; a generation's prompt) under the conditions it was timed in (`timing_mode`)."""
    batch, tokens = inputs["input_ids"].shape
    flops = attention_flops(config, batch, tokens, causal)
    with timing_mode(contenders, timing):
        for key, contender in contenders.items():
            found = profile_attention(contender, inputs)
            figures[key].update(attention_figures(found, flops, ceilings.get(contender.device)))
