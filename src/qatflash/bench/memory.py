"""Peak memory of one forward: CUDA allocator statistics, or the process's resident-set high-water mark.

On CPU there is no allocator to ask, so the figure is Linux's VmHWM (peak resident set) after
resetting it to the current RSS (`/proc/self/clear_refs`, value 5): the forward's peak above the
memory already resident. Measured in a fresh process before any full-size forward, the baseline
holds no freed-but-cached blocks of an earlier, larger point, which would hide part of the peak.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS} has no {field}; peak host memory needs Linux")
    return int(match.group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def address_space_bytes() -> int:
    return _status_kib("VmSize") * 1024


def peak_memory(step: Callable[[], object], device: torch.device) -> dict[str, int | str]:
    """Run `step` once and return its peak memory above what was in use just before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - before,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "memory_method": "cuda: max_memory_allocated - memory_allocated before the forward",
        }
    before = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    return {
        "peak_memory_bytes": _status_kib("VmHWM") * 1024 - before,
        "memory_method": "cpu: VmHWM - VmRSS before the forward (peak reset via /proc/self/clear_refs)",
    }
