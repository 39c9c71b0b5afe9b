"""The report's statistics against hand-worked cases, the FP32 reference found by config hash, the
latency pairing that refuses unlike conditions, and the busy-host flag under a real competing process."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from qatflash.config import TimingConfig
from qatflash.job import JobContext
from qatflash.report.stats import (
    IDENTICAL,
    Interval,
    mcnemar,
    paired_delta,
    relative_perplexity,
    t_interval,
    verdict,
)
from qatflash.timing.host import HostWindow
from qatflash.timing.latency import LatencyStats, SideBySide, time_in_rounds
from qatflash.timing.pairing import Conditions, paired_ratios

_CPU = torch.device("cpu")
_ROUNDS = TimingConfig(warmup=0, min_iters=10, min_duration_s=0.3, block_iters=5)


def test_t_interval_over_three_seeds_by_hand() -> None:
    # mean 2, standard error 1/sqrt(3), t(0.975, 2) = 4.302653: 2 ± 2.484138
    spread = t_interval([1.0, 2.0, 3.0])
    assert spread.n == 3 and spread.t == pytest.approx(4.302653, abs=1e-6)
    assert (spread.interval.low, spread.interval.high) == pytest.approx((-0.484138, 4.484138), abs=1e-6)
    one = t_interval([0.85])
    assert one.n == 1 and np.isnan(one.interval.low) and np.isnan(one.t)


def test_t_interval_of_an_accuracy_is_cut_at_100_percent() -> None:
    # mean 0.99, standard error 0.01 / sqrt(3), t(0.975, 2) = 4.302653: 0.99 ± 0.024841, past 1 above
    spread = t_interval([1.0, 0.99, 0.98], within=(0.0, 1.0))
    assert spread.interval.estimate == pytest.approx(0.99) and spread.clipped
    assert (spread.interval.low, spread.interval.high) == pytest.approx((0.965159, 1.0), abs=1e-6)
    inside = t_interval([0.90, 0.91, 0.92], within=(0.0, 1.0))
    assert not inside.clipped and inside.interval == t_interval([0.90, 0.91, 0.92]).interval


def test_mcnemar_exact_by_hand_and_with_identical_predictions() -> None:
    reference = np.array([1] * 10 + [0] * 6 + [1] * 4, dtype=bool)
    model = np.array([1] * 9 + [0] + [1] * 6 + [1] * 4, dtype=bool)  # b = 1 lost, c = 6 gained
    test = mcnemar(model, reference)
    # two-sided exact binomial over the 7 disagreements: 2 × P(X <= 1 | 7, 0.5) = 2 × 8 / 128
    assert (test.b, test.c) == (1, 6) and test.p == pytest.approx(0.125) and test.note is None
    same = mcnemar(reference, reference)
    assert (same.b, same.c, same.p, same.note) == (0, 0, 1.0, IDENTICAL)


def test_paired_bootstrap_is_paired_and_reproducible() -> None:
    """Two models that agree on all but 8 of 400 examples: pairing sees a difference of at most a few
    examples; an unpaired interval of two ~80 % accuracies would be about ±5.5 points wide."""
    rng = np.random.default_rng(1)
    reference = rng.random(400) < 0.8
    model = reference.copy()
    flips = rng.choice(400, size=8, replace=False)
    model[flips] = ~model[flips]
    delta = paired_delta(model, reference)
    assert delta.estimate == pytest.approx(model.mean() - reference.mean())
    assert delta.low <= delta.estimate <= delta.high and delta.high - delta.low < 0.03
    assert paired_delta(model, reference) == delta  # the fixed seed: the same interval every time
    assert paired_delta(reference, reference) == Interval(0.0, 0.0, 0.0)
    better = paired_delta(np.ones(50, dtype=bool), np.zeros(50, dtype=bool))
    assert better == Interval(1.0, 1.0, 1.0) and better.significant


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.001, 0.02, "better"),
        (-0.005, 0.02, "non-inferior"),
        (-0.03, -0.015, "worse"),
        (-0.02, 0.005, "inconclusive"),
        (-0.02, -0.005, "inconclusive"),  # significant, yet neither within nor beyond the margin
    ],
)
def test_verdict_in_its_order_at_a_one_point_margin(low: float, high: float, expected: str) -> None:
    assert verdict(Interval((low + high) / 2, low, high), margin_points=1.0) == expected


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (-0.03, -0.001, "better"),
        (0.0131, 0.0145, "non-inferior"),  # README's ptq_dynamic perplexity: +1.38 % [+1.31, +1.45]
        (-0.01, 0.015, "non-inferior"),
        (0.025, 0.035, "worse"),  # 3 % higher perplexity, beyond the 2 % margin
        (0.01, 0.03, "inconclusive"),
        (0.005, 0.019, "non-inferior"),  # significantly worse, yet within the margin
    ],
)
def test_verdict_of_a_perplexity_change_reads_lower_as_better(low: float, high: float, expected: str) -> None:
    delta = Interval((low + high) / 2, low, high)
    assert verdict(delta, margin_points=2.0, higher_is_better=False) == expected


def test_relative_perplexity_pairs_the_windows() -> None:
    """Every window of the model scores 0.95 % of perplexity worse than the reference's, on windows
    whose own perplexity ranges from 7.4 to 55: paired, each resample holds the same change, so
    the interval is that point; unpaired, it would carry the spread between windows (−79 % to
    +392 %)."""
    tokens = np.array([10, 20, 15, 30, 25, 12, 18, 22], dtype=float)
    reference = np.array([2.0, 3.5, 2.5, 4.0, 3.0, 2.25, 3.75, 2.75]) * tokens
    model = reference + np.log(1.0095) * tokens
    change = relative_perplexity(model, reference, tokens)
    assert (change.estimate, change.low, change.high) == pytest.approx((0.0095,) * 3, abs=1e-12)


def test_the_fp32_reference_is_the_config_less_quant_and_benchmark(make_cfg) -> None:
    from omegaconf import OmegaConf

    def job(*overrides: str) -> JobContext:
        resolved = OmegaConf.to_container(make_cfg(*overrides), resolve=True)
        return JobContext(folder=None, choices={}, resolved_config=resolved)  # type: ignore[arg-type]

    fp32, ptq = job("quant=fp32"), job("quant=ptq_dynamic", "benchmark.min_iters=7")
    other_seed = job("quant=fp32", "seed=1")
    assert fp32.config_hash != ptq.config_hash
    assert fp32.hash_without("quant", "benchmark") == ptq.hash_without("quant", "benchmark")
    assert other_seed.hash_without("quant", "benchmark") != fp32.hash_without("quant", "benchmark")
    assert other_seed.hash_without("seed") == fp32.hash_without("seed")


def _timed(*block_medians: float) -> SideBySide:
    stats = LatencyStats.from_samples(list(block_medians), 0, 1, 8)
    return SideBySide(stats, list(block_medians), HostWindow().load())


def test_a_ratio_pairs_only_rows_timed_under_the_same_conditions() -> None:
    """pt2e's INT8 runs compiled: paired with FP32 compiled, never with eager FP32; without an FP32
    row of its conditions it gets no ratio and the reason."""
    timed = {("float", "torch"): _timed(10, 10), ("quantized", "torch_compile"): _timed(6, 6)}
    conditions = {key: Conditions("cpu", key[1], 2, "float32") for key in timed}
    unpaired = paired_ratios(timed, conditions)["quantized", "torch_compile"]
    assert "ratio_to_float" not in unpaired and unpaired["ratio_reference"] is None
    assert (
        unpaired["ratio_to_float_missing"]
        == "no float row timed on cpu float32 with torch_compile at 2 threads"
    )
    assert unpaired["ratio_to_torch_float"] == 0.6 and unpaired["torch_float_reference"] == "float/torch"
    timed["float", "torch_compile"] = _timed(8, 8)
    conditions["float", "torch_compile"] = Conditions("cpu", "torch_compile", 2, "float32")
    paired = paired_ratios(timed, conditions)["quantized", "torch_compile"]
    assert paired["ratio_to_float"] == 0.75 and paired["ratio_reference"] == "float/torch_compile"
    # The same backend on another device (CPU INT8 of a CUDA-trained model) is not its like either.
    conditions["float", "torch_compile"] = Conditions("cuda", "torch_compile", 2, "float32")
    assert paired_ratios(timed, conditions)["quantized", "torch_compile"]["ratio_reference"] is None


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_busy_host_is_measured_and_flagged_with_a_real_competing_process() -> None:
    window = HostWindow()
    _spin(0.6)  # this process's own work is not another's load: the same as when it sleeps
    own = window.load()
    window = HostWindow()
    time.sleep(0.6)
    asleep = window.load()
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        window = HostWindow()
        _spin(0.6)
        busy = window.load()
        timed = time_in_rounds(
            {"a": (lambda: _spin(0.01), _CPU), "b": (lambda: _spin(0.01), _CPU)}, _ROUNDS, seq_len=8
        )
    finally:
        competitor.kill()
        competitor.wait()
    assert busy.other_processes > 0.6 and busy.busy and busy.as_dict()["host_busy"] is True
    assert abs(own.other_processes - asleep.other_processes) < 0.5
    assert own.other_processes < busy.other_processes - 0.4
    assert timed["a"].host is timed["b"].host and timed["a"].host.busy  # one window for the rounds
