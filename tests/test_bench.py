"""qatflash-bench: a row per point, memory from a fresh process, out-of-memory as a result, refusals."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from qatflash import ort
from qatflash.bench.app import run_benchmark
from qatflash.cli import bench_main
from qatflash.config import to_config
from qatflash.errors import ConfigError
from qatflash.job import JobContext
from qatflash.results import read_results

# tiny_bert's shape with random weights: points take well under a second.
QUICK = [
    "model=tiny_bert",
    "logger=none",
    "benchmark.warmup=1",
    "benchmark.min_iters=3",
    "benchmark.min_duration_s=0",
]


def _bench(make_bench_cfg, folder: Path, *overrides: str) -> dict:
    config = to_config(make_bench_cfg(*QUICK, *overrides))
    return run_benchmark(
        config, JobContext(folder=folder, choices={"model": "tiny_bert", "attention": "eager"})
    )


@pytest.mark.processes
def test_every_point_gets_a_row_with_latency_and_memory(make_bench_cfg, tmp_path: Path) -> None:
    results = _bench(
        make_bench_cfg, tmp_path, "attention=eager", "bench.seq_lens=[32,512]", "bench.batch_sizes=[1,2]"
    )
    assert results["status"] == "ok" and read_results(tmp_path)["status"] == "ok"
    rows = results["latency"]
    assert [(r["seq_len"], r["batch_size"]) for r in rows] == [(32, 1), (32, 2), (512, 1), (512, 2)]
    for row in rows:
        assert row["status"] == "ok" and row["isolated"] is True and row["iters"] >= 3  # measured in a child
        assert row["memory_method"].startswith("cpu: VmHWM")
    peak = {(r["seq_len"], r["batch_size"]): r["peak_memory_bytes"] for r in rows}
    # Eager attention holds (batch, heads, seq, seq) scores: 16x the tokens cost far more than 16x the memory floor.
    assert peak[(512, 2)] > peak[(512, 1)] > peak[(32, 1)]


@pytest.mark.processes
def test_a_point_over_the_memory_cap_is_recorded_not_raised(make_bench_cfg, tmp_path: Path) -> None:
    results = _bench(
        make_bench_cfg,
        tmp_path,
        "attention=eager",
        "bench.seq_lens=[16,512]",
        "bench.batch_sizes=[8]",
        "bench.max_memory_gb=0.02",
    )
    small, large = results["latency"]
    assert small["status"] == "ok"
    assert (large["status"], large["error"]) == ("failed", "out of memory")
    assert results["status"] == "ok"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bench.seq_lens=[1024]"], r"bench.seq_lens holds \[1024\], beyond the model's position limit 512"),
        (["benchmark.backends=[onnx]"], "benchmark.backends entry='onnx' is not allowed"),
        (["benchmark.backends=[torch,torch]"], r"benchmark.backends=\['torch', 'torch'\] repeats a backend"),
        (
            ["benchmark.backends=[onnxruntime]", "bench.dtype=bfloat16"],
            "onnxruntime, which runs float32 on the CPU here; got bench.device=cpu bench.dtype=bfloat16",
        ),
        (["bench.batch_sizes=[0]"], r"bench.batch_sizes holds \[0\]"),
    ],
)
def test_bad_bench_input_is_refused_before_any_point(
    make_bench_cfg, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _bench(make_bench_cfg, tmp_path, *overrides)
    assert read_results(tmp_path) is None or read_results(tmp_path)["latency"] == []


@pytest.mark.needs("onnx")
def test_onnxruntime_point_times_the_exported_model(
    make_bench_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The onnxruntime row's forwards are ONNX Runtime sessions' (counted in this process), the torch row's are not."""
    sessions: list[int] = []
    forward = ort.OrtModel.forward

    def counted(self, **inputs):
        sessions.append(1)
        return forward(self, **inputs)

    monkeypatch.setattr(ort.OrtModel, "forward", counted)
    results = _bench(
        make_bench_cfg, tmp_path, "bench.seq_lens=[64]", "bench.isolate=false", "benchmark.backends=[torch]"
    )
    assert results["latency"][0]["status"] == "ok" and not sessions
    assert results["latency"][0]["attention_kernel"] == "flash"
    results = _bench(
        make_bench_cfg,
        tmp_path,
        "bench.seq_lens=[64]",
        "bench.isolate=false",
        "benchmark.backends=[onnxruntime]",
    )
    (row,) = results["latency"]
    assert row["status"] == "ok" and row["backend"] == "onnxruntime"
    assert "attention_kernel" not in row  # the profiler sees no kernel inside a session
    # the warm-up on a short input, the peak-memory forward, then the timed ones
    assert len(sessions) == 1 + 1 + row["warmup"] + row["iters"]


def test_a_training_runs_int8_artifact_is_timed_without_retraining(
    trained_runs: Path, make_bench_cfg, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_runs / "quant=ptq_dynamic", run_dir)
    results = _bench(
        make_bench_cfg,
        tmp_path / "bench",
        f"bench.artifact={run_dir}",
        "bench.seq_lens=[32,64]",
        "bench.isolate=false",
    )
    assert [(r["status"], r["seq_len"], r["artifact"]) for r in results["latency"]] == [
        ("ok", 32, str(run_dir)),
        ("ok", 64, str(run_dir)),
    ]
    with pytest.raises(
        ConfigError, match=r"bench.artifact=.* is not a run folder with a readable results.json"
    ):
        _bench(make_bench_cfg, tmp_path / "refused", f"bench.artifact={tmp_path / 'bench'}/nothing")
    (run_dir / "quantized_model.pt").unlink()
    with pytest.raises(ConfigError, match=r"bench.artifact=.* holds no quantized artifact"):
        _bench(make_bench_cfg, tmp_path / "refused", f"bench.artifact={run_dir}")


def test_missing_onnx_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "_PACKAGES", ("onnxruntime", "no_such_onnx_package"))
    with pytest.raises(ConfigError, match=r"\['no_such_onnx_package'\] are not installed; install the extra"):
        ort.check_onnxruntime()


@pytest.mark.needs("cuda")
def test_cuda_points_are_timed_with_events_and_read_the_allocators_peak(
    make_bench_cfg, tmp_path: Path
) -> None:
    results = _bench(
        make_bench_cfg,
        tmp_path,
        "attention=eager",
        "bench.device=cuda",
        "bench.dtype=bfloat16",
        "bench.seq_lens=[64,2048]",
        "model.arch.max_position_embeddings=2048",
    )
    rows = results["latency"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row in rows:
        assert (row["device"], row["dtype"], row["timer"]) == ("cuda", "bfloat16", "cuda_event")
        assert row["memory_method"].startswith("cuda: max_memory_allocated") and row["p50_ms"] > 0
    short, long = rows
    # Eager attention's (heads, seq, seq) scores: 32x the tokens cost far more than 32x the memory.
    assert long["peak_memory_bytes"] > 32 * short["peak_memory_bytes"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_refused(make_bench_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bench.device=cuda but no CUDA device is visible"):
        _bench(make_bench_cfg, tmp_path, "bench.device=cuda")


def test_bench_multirun_over_attention_from_the_command_line(run_app, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code, stderr = run_app(
        "-m",
        "attention=eager,sdpa",
        *QUICK,
        "bench.seq_lens=[64]",
        "bench.isolate=false",
        f"hydra.sweep.dir={sweep}",
        entry=bench_main,
    )
    assert code == 0, stderr[-3000:]
    results = [read_results(p) for p in sorted(sweep.rglob("results.json"))]
    assert [r["choices"]["attention"] for r in results] == ["eager", "sdpa"]
    assert all(
        r["status"] == "ok" and r["latency"][0]["attention"] == r["choices"]["attention"] for r in results
    )


class _FakeCuda:
    """torch.cuda's timing and memory calls, replaced at that boundary only: the harness's own logic
    (what it records, when it synchronises, what it subtracts) runs as it would on a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gpu_ms = 0.0  # the device's clock, advanced by the work "launched"
        self.syncs = 0  # torch.cuda.synchronize: the host waits for the whole device
        self.event_syncs = 0  # Event.synchronize: the host waits for one recorded event
        self.allocated, self.peak, self.resets = 1_000, 50_000, 0
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                assert enable_timing
                self.at: float | None = None

            def record(self) -> None:
                self.at = fake.gpu_ms

            def synchronize(self) -> None:
                fake.event_syncs += 1

            def elapsed_time(self, end: Event) -> float:
                assert fake.syncs >= 2, "elapsed time read before the device was synchronised"
                assert self.at is not None and end.at is not None
                return end.at - self.at

        def synchronize(device: object = None) -> None:
            fake.syncs += 1

        def reset_peak_memory_stats(device: object = None) -> None:
            fake.resets += 1
            fake.peak = fake.allocated

        for name, value in {
            "Event": Event,
            "synchronize": synchronize,
            "reset_peak_memory_stats": reset_peak_memory_stats,
            "memory_allocated": lambda device=None: fake.allocated,
            "max_memory_allocated": lambda device=None: fake.peak,
            "max_memory_reserved": lambda device=None: 2 * fake.peak,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_cuda_timing_uses_events_and_bounds_the_hosts_lead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device time per forward from events; the host synchronises before and after the loop, and
    inside it waits for every CUDA_SYNC_EVERY-th forward's end event, never for each forward."""
    from qatflash.config import TimingConfig
    from qatflash.timing.latency import CUDA_SYNC_EVERY, time_in_rounds

    cuda = _FakeCuda(monkeypatch)
    timed = 2 * CUDA_SYNC_EVERY + 3
    durations = iter([9.0, 9.0] + [float(1 + i % 5) for i in range(timed)])  # two warm-up forwards first

    def forward() -> None:
        cuda.gpu_ms += next(durations)

    cfg = TimingConfig(warmup=2, min_iters=timed, min_duration_s=0.0, block_iters=timed)
    stats = time_in_rounds({"model": (forward, torch.device("cuda"))}, cfg, seq_len=8)["model"].stats
    expected = [float(1 + i % 5) for i in range(timed)]  # device time per forward, warm-up excluded
    assert stats.iters == timed and stats.mean_ms == pytest.approx(sum(expected) / timed)
    assert cuda.syncs == 2  # the whole device: before and after the timed loop
    assert cuda.event_syncs == 2  # inside the loop: after forwards 64 and 128 of 131


def test_cuda_peak_memory_is_measured_above_what_was_allocated_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qatflash.timing.memory import peak_memory

    cuda = _FakeCuda(monkeypatch)

    def forward() -> None:  # an activation peak of 4,000 bytes, 200 of which stay allocated
        cuda.peak = max(cuda.peak, cuda.allocated + 4_000)
        cuda.allocated += 200

    figures = peak_memory(forward, torch.device("cuda"))
    # The stale peak of 50,000 left by earlier work was reset before the forward.
    assert cuda.resets == 1 and figures["peak_memory_bytes"] == 4_000
    assert figures["peak_reserved_bytes"] == 10_000
    assert str(figures["memory_method"]).startswith("cuda: max_memory_allocated")


def test_models_compared_side_by_side_alternate_in_blocks_and_pair_their_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that slows 2.6-fold while measuring: a model twice as fast still reads 0.5."""
    from qatflash.config import TimingConfig
    from qatflash.timing.latency import Contender, measure_side_by_side

    clock = {"now": 0.0, "forwards": 0}
    calls: list[str] = []

    class Sleeper(torch.nn.Module):
        def __init__(self, name: str, cost_s: float) -> None:
            super().__init__()
            self.name, self.cost_s = name, cost_s

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            assert not self.training and torch.is_inference_mode_enabled()
            calls.append(self.name)
            clock["forwards"] += 1
            clock["now"] += self.cost_s * (1 + clock["forwards"] / 50)  # the host's load drifts up
            return input_ids

    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    cpu = torch.device("cpu")
    contenders = {
        "fp32": Contender(Sleeper("fp32", 0.002), cpu),
        "int8": Contender(Sleeper("int8", 0.001), cpu),
    }
    cfg = TimingConfig(warmup=1, min_iters=40, min_duration_s=0.0, block_iters=5)
    timed = measure_side_by_side(contenders, cfg, seq_len=8, vocab_size=10)

    assert calls[:2] == ["fp32", "int8"]  # one warm-up forward each
    blocks = [calls[i] for i in range(2, len(calls), 5)]
    assert calls[2:] == [name for name in blocks for _ in range(5)]  # whole blocks of five
    # Rounds alternate which model goes first, so neither always runs on the later, slower host.
    assert blocks[:8] == ["fp32", "int8", "int8", "fp32", "fp32", "int8", "int8", "fp32"]
    assert timed["fp32"].stats.iters == timed["int8"].stats.iters == 40
    paired = timed["int8"].ratio_to(timed["fp32"])
    assert paired["rounds"] == 8 and abs(paired["ratio"] - 0.5) < 0.02
    # Every round pairs neighbouring blocks: even its spread stays near 0.5 while the host slows 2.6-fold.
    assert paired["ratio_p10"] > 0.45 and paired["ratio_p90"] < 0.55
    assert all(c.model.training for c in contenders.values())  # the modes they came in are restored
