"""What else the host did while a model was timed: CPU time taken by other processes, and time the
hypervisor stole from this VM.

A latency on a shared host is only as good as the minutes it was measured in. On this project's
2-core VM, one competing process moved tiny_bert's 2-thread forward from 4.7 ms to 13.6–169 ms,
while the paired ratio of two models timed in the same rounds moved far less. So every latency row
carries the load of its window, in fractions of one core, and is flagged `host_busy` when either
share exceeds `BUSY_SHARE_OF_ONE_CORE`: a reader then knows which absolute figures not to compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

# Above this share of one core taken by others (or stolen) over the window, a row is marked busy.
BUSY_SHARE_OF_ONE_CORE = 0.10


@dataclass(frozen=True)
class HostLoad:
    """The load over one timed window, each as a share of one core (1.0: a whole core all along)."""

    window_s: float
    other_processes: float
    steal: float

    @property
    def busy(self) -> bool:
        return max(self.other_processes, self.steal) > BUSY_SHARE_OF_ONE_CORE

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "host_window_s": round(self.window_s, 3),
            "host_other_cpu": round(self.other_processes, 3),
            "host_steal": round(self.steal, 3),
            "host_busy": self.busy,
        }


def _busy_seconds(times: psutil._common.scputimes) -> float:
    """CPU seconds spent running anything (the idle and iowait states excluded), summed over CPUs."""
    idle = getattr(times, "idle", 0.0) + getattr(times, "iowait", 0.0) + getattr(times, "steal", 0.0)
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # already in user
    return sum(times) - idle - guest


def _own_seconds(process: psutil.Process) -> float:
    """This process's CPU seconds: its threads (ONNX Runtime's included) and its waited-for children."""
    own = process.cpu_times()
    return own.user + own.system + own.children_user + own.children_system


class HostWindow:
    """A window opened now: `load()` reads the host's load since, as shares of one core."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._started = time.perf_counter()
        self._system = psutil.cpu_times()
        self._own = _own_seconds(self._process)

    def load(self) -> HostLoad:
        window = max(time.perf_counter() - self._started, 1e-9)
        system = psutil.cpu_times()
        busy = _busy_seconds(system) - _busy_seconds(self._system)
        other = max(0.0, busy - (_own_seconds(self._process) - self._own))
        steal = getattr(system, "steal", 0.0) - getattr(self._system, "steal", 0.0)
        return HostLoad(window, other / window, max(0.0, steal) / window)
