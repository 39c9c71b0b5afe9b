"""Where a slow model's time goes: torch.profiler's top operators by self time over a few steps.

A weight-only scheme that is slower than FP32 is only half a result without the reason (a
dequantize before every matmul, a repack, per-call dispatch overhead), so a benchmark attaches
this breakdown to every quantized row slower than its float twin, and to that twin for contrast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPS = 8


def top_ops(run: Callable[[Callable[[], None]], object], device: torch.device) -> list[dict[str, Any]]:
    """The `TOP_OPS` operators with the most self time from when `run` calls the `start` it is given
    (once: after prefill, so that decode is what is profiled) to its end."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = profile(activities=activities)
    run(profiler.start)
    profiler.stop()
    events = profiler.key_averages()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attribute) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:TOP_OPS]
    return [
        {
            "op": e.key,
            "self_ms": round(getattr(e, attribute) / 1000.0, 3),
            "share": round(getattr(e, attribute) / total, 4),
            "calls": e.count,
        }
        for e in ranked
    ]
