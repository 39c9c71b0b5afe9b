"""Benchmarks whose figures can be trusted: per-iteration latency with spread, models compared side
by side in interleaved rounds, peak memory in a fresh process, and `qatflash-bench`, which times
models over sequence lengths, batch sizes and backends."""

from qatflash.bench.latency import Contender, LatencyStats, SideBySide, measure_side_by_side, time_in_rounds

__all__ = ["Contender", "LatencyStats", "SideBySide", "measure_side_by_side", "time_in_rounds"]
