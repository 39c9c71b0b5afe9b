"""Benchmarks: latency (and, later, memory, size and backends) measured so the figures can be trusted."""

from qatflash.bench.latency import LatencyStats, measure_forward_latency

__all__ = ["LatencyStats", "measure_forward_latency"]
