"""Peak memory of one forward: CUDA allocator statistics, or the process's resident-set high-water mark.

On CPU there is no allocator to ask, so the figure is Linux's VmHWM (peak resident set) after
resetting it to the current RSS (`/proc/self/clear_refs`, value 5), freed memory handed back to the
OS first (`malloc_trim`): the forward's peak above the memory live just before. Measured in a fresh
process before any full-size forward, the baseline holds no freed-but-cached blocks of an earlier,
larger point, which would hide part of the peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
# glibc mallopt parameters (malloc.h) and the mmap thresholds it starts from and grows up to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD_MIN, _MMAP_THRESHOLD_MAX = 128 * 1024, 32 * 2**20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (`find_library` runs `ldconfig`); None where there is none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _mallopt(*settings: tuple[int, int]) -> bool:
    libc = _libc()
    return (
        libc is not None
        and hasattr(libc, "mallopt")
        and all(libc.mallopt(param, value) == 1 for param, value in settings)
    )


def _release_freed_memory() -> None:
    """Hand memory that glibc keeps from freed blocks back to the OS (`malloc_trim(0)`).

    Freed blocks inside the heap stay resident, and a later allocation reuses them without raising
    the RSS: after a process has freed more than a fit then allocates (a test session, a sweep's
    earlier points), VmHWM above the RSS read 0 for a whole fit. Trimmed first, the baseline is the
    live memory (plus fragmentation) and what the measured step allocates shows. A no-op without glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def exact_host_allocator() -> bool:
    """Make this fresh process's RSS follow its live tensors, so that VmHWM measures a forward's peak.

    By default glibc keeps freed memory in per-thread arenas and raises its mmap threshold as large
    blocks are freed, so how much of a forward's peak is served from memory already resident
    depends on thread scheduling: identical isolated points read 39-60 MiB. With one arena and the
    threshold fixed at 128 KiB every larger tensor is mapped on allocation and unmapped on free
    (the same points then read 30 MiB every time). Call before the model is built; False where
    there is no glibc, and the figure is then the default allocator's.
    """
    return _mallopt((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MIN))


def steady_host_allocator() -> None:
    """After the memory figure, before timing: glibc's steady state, where freed blocks are reused.

    Mapping and unmapping every tensor costs page faults on each forward (about 30 % at 512 tokens);
    default glibc settles at a 32 MiB threshold once large blocks have been freed, and so does this.
    """
    _mallopt((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX))


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS} has no {field}; peak host memory needs Linux")
    return int(match.group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def address_space_bytes() -> int:
    return _status_kib("VmSize") * 1024


def peak_memory(
    step: Callable[[], object], device: torch.device, exact: bool = False
) -> dict[str, int | str]:
    """Run `step` once and return its peak memory above what was in use just before.

    `exact`: the process runs under `exact_host_allocator` (said in the method).
    """
    before = reset_peak(device)
    step()
    return peak_since(before, device, exact)


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory measurement on `device`; returns the bytes in use now, its baseline."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _release_freed_memory()
    before = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return before


def peak_since(before: int, device: torch.device, exact: bool = False) -> dict[str, int | str]:
    """The peak memory on `device` above `before` since `reset_peak`, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - before,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "memory_method": "cuda: max_memory_allocated - memory_allocated at the start",
        }
    return {
        "peak_memory_bytes": _status_kib("VmHWM") * 1024 - before,
        "memory_method": "cpu: VmHWM - VmRSS at the start (freed memory trimmed, peak reset via /proc/self/clear_refs)"
        + ("; glibc one arena, mmap threshold 128 KiB" if exact else ""),
    }
