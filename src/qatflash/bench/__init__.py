"""Benchmarks whose figures can be trusted: per-iteration latency with spread, peak memory in a fresh
process, and `qatflash-bench`, which times models over sequence lengths, batch sizes and backends."""

from qatflash.bench.latency import LatencyStats, measure_forward_latency

__all__ = ["LatencyStats", "measure_forward_latency"]
