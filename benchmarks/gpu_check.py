"""The GPU check: every CUDA path of `qatflash` and `qatflash-bench`, one step each, for one
H100/H200 inside ten minutes. Run it through `benchmarks/gpu_check.sh` (its header says how to
carry what the GPU machine lacks); `DRY_RUN=1` composes and preflights every step with CUDA faked
(CI runs that, so a step that stops composing fails CI, not the next GPU loan).

Each step runs in its own process under its own time limit, so a slow one cannot starve the next;
the check ends with one table of what every step recorded and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING
from unittest import mock

if TYPE_CHECKING:
    from qatflash.preflight import Point

REPO = Path(__file__).resolve().parents[1]
# What a run of all steps should stay within on one H100/H200, so a 15-minute loan has room to rerun.
# The formats_* steps and decode_7b_compiled and attention_head128 (added after the last loan) are not
# yet measured, and their limits alone add up past it: on a loan, pick with STEPS=.
BUDGET_S = 600
# Libraries that load their CUDA backend at import when torch reports CUDA (bitsandbytes' needs
# torch's CUDA build): imported before the fake is in place.
_IMPORT_BACKENDS = ("bitsandbytes", "torchao")
_PYTEST_SELECTION = (
    "-k",
    "cuda or gpu",
    "tests/test_attention.py",
    "tests/test_bench.py",
    "tests/test_pipeline.py",
    "tests/test_placement.py",
)


@dataclass(frozen=True)
class Step:
    """One check: a command of an app (`qatflash`, `qatflash-bench`, or `pytest` for the CUDA tests),
    what it proves, its time limit, and a package it needs (the step is skipped without it)."""

    name: str
    proves: str
    app: str
    args: tuple[str, ...]
    limit_s: int
    requires_module: str | None = None
    may_run_out_of_memory: bool = False  # a benchmark point over its memory cap is a result, not a failure

    @property
    def command(self) -> list[str]:
        module = {"qatflash": "qatflash", "qatflash-bench": "qatflash.bench", "pytest": "pytest"}[self.app]
        return [sys.executable, "-m", module, *self.args]


def steps(out: Path, data: Path) -> list[Step]:
    """The steps in order; job folders land under `out`, WikiText-2 is read from `data`/wikitext2."""
    quick = ("benchmark.warmup=1", "benchmark.min_iters=3", "benchmark.min_duration_s=0")
    decoder = (
        "task=causal_lm",
        "model=llama_tiny",
        "data=wikitext2",
        f"data.path={data / 'wikitext2'}",
        "trainer=gpu",
        "logger=csv",
        "data.batch_size=1",
        "trainer.max_steps=40",
        "benchmark.new_tokens=32",
        "benchmark.max_duration_s=20",
        *quick,
    )
    return [
        Step(
            "cuda_tests",
            "the CUDA tests: forced-kernel refusals, CUDA-event timing, QAT and PTQ trained in bf16 "
            "on the GPU and shipped as CPU INT8, bitsandbytes int8 and NF4 quantized on the CPU and "
            "run on the GPU once placed",
            "pytest",
            ("-q", "-p", "no:cacheprovider", *_PYTEST_SELECTION),
            90,
        ),
        Step(
            "classification_sdpa_flash",
            "an encoder trained in bf16 with SDPA's flash kernel; its forward timed with CUDA events at 32 x 512",
            "qatflash",
            (
                "trainer=gpu",
                "attention=sdpa_flash",
                "logger=csv",
                "data.synthetic.num_train=2000",
                "trainer.max_epochs=1",
                "benchmark.batch_size=32",
                "benchmark.seq_len=512",
                *quick,
                f"hydra.run.dir={out / 'classification_sdpa_flash'}",
            ),
            60,
        ),
        Step(
            "decoder_qat_ffn_L4096",
            "a decoder trained at 4k tokens in bf16 with SDPA flash and FFN-only QAT, shipped as CPU "
            "INT8; generation (prefill + 32 decoded tokens) timed after the GPU fit, FP32 on the GPU",
            "qatflash",
            (
                *decoder,
                "attention=sdpa_flash",
                "quant=qat_x86_ffn",
                "quant.fake_quant_start_step=0.5",
                "data.max_length=4096",
                f"hydra.run.dir={out / 'decoder_qat_ffn_L4096'}",
            ),
            90,
        ),
        Step(
            "decoder_L16384",
            "the decoder trained at 16k tokens per block (its position limit) with SDPA flash; "
            "generation timed from a 16,352-token prompt, whose 32 new tokens end at that limit",
            "qatflash",
            (
                *decoder,
                "attention=sdpa_flash",
                "data.max_length=16384",
                "benchmark.seq_len=16352",
                f"hydra.run.dir={out / 'decoder_L16384'}",
            ),
            90,
        ),
        Step(
            "decoder_fa2_L16384",
            "the same with the flash-attn package's FlashAttention-2",
            "qatflash",
            (
                *decoder,
                "attention=flash_attention_2",
                "data.max_length=16384",
                "benchmark.seq_len=16352",
                f"hydra.run.dir={out / 'decoder_fa2_L16384'}",
            ),
            90,
            requires_module="flash_attn",
        ),
        Step(
            "attention_scaling",
            "prefill and decode of a 45M decoder in bf16 to 32k tokens with eager attention, SDPA, "
            "SDPA flash and cuDNN, under a 60 GB memory cap (eager at 32k is a recorded out-of-memory point)",
            "qatflash-bench",
            (
                "-m",
                "experiment=llm_attention_scaling",
                "bench.device=cuda",
                "bench.dtype=bfloat16",
                "bench.seq_lens=[1024,4096,16384,32752]",
                "attention=eager,sdpa,sdpa_flash,sdpa_cudnn",
                "bench.max_memory_gb=60",
                "bench.isolate=false",
                "benchmark.max_duration_s=5",
                "logger=csv",
                f"hydra.sweep.dir={out / 'attention_scaling'}",
            ),
            120,
            may_run_out_of_memory=True,
        ),
        Step(
            "formats_fp8_rowwise",
            "FP8 rowwise PTQ and QAT of the decoder trained in bf16, beside its float point: the "
            "perplexity of each (deltas with CIs: qatflash-report on this sweep) and FP8's generation "
            "paired with bf16's (torchao's Float8 kernels, compute capability 8.9+)",
            "qatflash",
            (
                "-m",
                *decoder,
                "quant=fp32,ptq_fp8_rowwise,qat_fp8_rowwise",
                'quant.targets.include=["*layers.*"]',  # the LM head's width need not be a multiple of 16
                f"hydra.sweep.dir={out / 'formats_fp8_rowwise'}",
            ),
            150,
        ),
        Step(
            "formats_int4_tinygemm",
            "tinygemm int4 weight-only (PTQ and QAT with tinygemm's asymmetric numerics) of the same "
            "decoder: decode per token and prefill paired with bf16's in one process",
            "qatflash",
            (
                "-m",
                *decoder,
                "quant=fp32,wo_int4_tinygemm,qat_int4_tinygemm",
                'quant.targets.include=["*layers.*"]',
                f"hydra.sweep.dir={out / 'formats_int4_tinygemm'}",
            ),
            150,
        ),
        Step(
            "formats_mxfp8",
            "MXFP8 QAT (emulated kernels) of the decoder trained on the GPU: its fake-quant and shipped "
            "bf16 perplexity",
            "qatflash",
            (*decoder, "quant=qat_mxfp8", f"hydra.run.dir={out / 'formats_mxfp8'}"),
            120,
        ),
        Step(
            "decode_weight_only",
            "decode of a 125M decoder in fp16 beside torchao int8 weight-only and bitsandbytes "
            "LLM.int8 and NF4, each point in its own spawned process",
            "qatflash-bench",
            (
                "-m",
                "experiment=llm_decode_weight_only",
                "bench.device=cuda",
                "bench.dtype=float16",
                "quant=wo_torchao_int8,wo_bnb_int8,wo_bnb_nf4",
                "benchmark.max_duration_s=10",
                "logger=csv",
                f"hydra.sweep.dir={out / 'decode_weight_only'}",
            ),
            120,
        ),
        Step(
            "decode_7b_compiled",
            "compiled decode (static cache, CUDA graphs) beside eager decode of 8 of llama_7b_shape's 32 "
            "layers in bf16 (3.2 GiB of layer weights; 8 to fit the time limit), each point bf16 beside "
            "tinygemm int4, torchao int8 weight-only, FP8 rowwise or bitsandbytes NF4: bytes per token "
            "against the copy bandwidth and prefill FLOPs against the bf16 matmul, measured in the point",
            "qatflash-bench",
            (
                "-m",
                "task=causal_lm",
                "model=llama_7b_shape",
                "model.arch.num_hidden_layers=8",
                "bench.device=cuda",
                "bench.dtype=bfloat16",
                "bench.seq_lens=[512]",
                "benchmark.new_tokens=32",
                "benchmark.kv_cache=static",
                "benchmark.decode=compiled",
                "quant=wo_int4_tinygemm,wo_torchao_int8,ptq_fp8_rowwise,wo_bnb_nf4",
                *quick,
                "benchmark.max_duration_s=10",
                "logger=csv",
                f"hydra.sweep.dir={out / 'decode_7b_compiled'}",
            ),
            420,
        ),
        Step(
            "attention_head128",
            "prefill of 2 of llama_7b_shape's layers (32 heads of 128) in bf16 at 4k-32k tokens with "
            "eager attention, SDPA's default, flash, cuDNN and flex_attention, under a 60 GB cap; each row "
            "names the kernel the profiler saw and the attention core's TFLOP/s against the bf16 matmul",
            "qatflash-bench",
            (
                "-m",
                "task=causal_lm",
                "model=llama_7b_shape",
                "model.arch.num_hidden_layers=2",
                "bench.device=cuda",
                "bench.dtype=bfloat16",
                "bench.seq_lens=[4096,8192,16384,32768]",
                "attention=eager,sdpa,sdpa_flash,sdpa_cudnn,flex_attention",
                "bench.max_memory_gb=60",
                *quick,
                "benchmark.max_duration_s=5",
                "logger=csv",
                f"hydra.sweep.dir={out / 'attention_head128'}",
            ),
            240,
            may_run_out_of_memory=True,
        ),
    ]


@dataclass
class Outcome:
    step: Step
    status: str  # ok, failed, timed out, skipped
    seconds: float = 0.0
    detail: str = ""
    results: list[dict] = field(default_factory=list)


def run(step: Step, out: Path) -> Outcome:
    """The step as a process of its own under its time limit; its log lands in `out`/<name>.log.
    It fails when its process fails, or when a point it timed failed (out of memory) where none may."""
    from qatflash.results import read_results

    if step.requires_module and importlib.util.find_spec(step.requires_module) is None:
        return Outcome(step, "skipped", detail=f"{step.requires_module} is not installed")
    started = time.perf_counter()
    log = out / f"{step.name}.log"
    with log.open("w") as sink:
        try:
            done = subprocess.run(step.command, stdout=sink, stderr=subprocess.STDOUT, timeout=step.limit_s)
        except subprocess.TimeoutExpired:
            done = None
    seconds = time.perf_counter() - started
    results = [read_results(p) or {} for p in sorted((out / step.name).rglob("results.json"))]
    if done is None:
        return Outcome(step, "timed out", seconds, f"over its {step.limit_s} s limit", results)
    if done.returncode != 0:
        refusals = [line for line in log.read_text().splitlines() if line.startswith("qatflash: error")]
        return Outcome(step, "failed", seconds, (refusals or [f"exit code {done.returncode}"])[0], results)
    failed = [row for r in results for row in r.get("latency") or [] if row.get("status", "ok") != "ok"]
    if failed and not step.may_run_out_of_memory:
        return Outcome(
            step, "failed", seconds, f"{len(failed)} point(s) failed: {failed[0].get('error')}", results
        )
    return Outcome(step, "ok", seconds, f"{len(failed)} point(s) out of memory" if failed else "", results)


def dry_run(step: Step) -> Outcome:
    """Compose every point of the step and run its config-level checks, CUDA faked (qatflash.preflight);
    the CUDA tests' step is collected, not run."""
    if step.requires_module and importlib.util.find_spec(step.requires_module) is None:
        return Outcome(step, "skipped", detail=f"{step.requires_module} is not installed")
    started = time.perf_counter()
    if step.app == "pytest":
        collected = subprocess.run([*step.command, "--collect-only"], capture_output=True, text=True)
        selected = [line for line in collected.stdout.splitlines() if "::" in line]
        ok = collected.returncode == 0 and bool(selected)
        return Outcome(
            step, "ok" if ok else "failed", time.perf_counter() - started, f"{len(selected)} tests"
        )
    from qatflash.errors import first_line
    from qatflash.preflight import points

    jobs = points(step.app, list(step.args))
    for point in jobs:
        try:
            preflight(point)
        except Exception as error:  # a refusal, or an error a GPU would have raised
            detail = f"{' '.join(point.overrides)}: {first_line(error)}"
            return Outcome(step, "failed", time.perf_counter() - started, detail)
    return Outcome(step, "ok", time.perf_counter() - started, f"{len(jobs)} point(s) preflighted")


def preflight(point: Point) -> None:
    """The point's config-level checks (qatflash.preflight), under a fake CUDA where it runs on one."""
    from qatflash.preflight import check, needs_cuda

    with fake_cuda() if needs_cuda(point) else contextlib.nullcontext():
        check(point)


@dataclass
class FakeCuda:
    """What the fake CUDA device was asked: the memory fractions set, by device index."""

    total_memory: int
    fractions: list[tuple[float, int]] = field(default_factory=list)


@contextlib.contextmanager
def fake_cuda(total_memory: int = 141 * 2**30, name: str = "fake NVIDIA H200") -> Iterator[FakeCuda]:
    """One CUDA device for config-level checks on a machine without one, replaced at torch's boundary
    only and as strict as torch there: `set_per_process_memory_fraction` is torch's own (a bare
    "cuda" without an index is refused as on a GPU); only its call into the driver is recorded."""
    import torch

    for library in _IMPORT_BACKENDS:  # they pick CUDA kernels at import: let them see the real machine
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(library)
    fake = FakeCuda(total_memory)

    def properties(device: object = None) -> SimpleNamespace:
        index = torch.cuda._utils._get_device_index(device, optional=True)
        if index != 0:
            raise AssertionError("Invalid device id")
        return SimpleNamespace(name=name, total_memory=total_memory, major=9, minor=0)

    patches = {
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "get_device_properties"): properties,
        (torch.cuda, "get_device_name"): lambda device=None: properties(device).name,
        (torch.cuda.memory, "_lazy_init"): lambda: None,
        (torch._C, "_cuda_setMemoryFraction"): lambda fraction, index: fake.fractions.append(
            (fraction, index)
        ),
    }
    with contextlib.ExitStack() as stack:
        for (owner, attribute), value in patches.items():
            stack.enter_context(mock.patch.object(owner, attribute, value, create=True))
        yield fake


def summary(outcomes: list[Outcome]) -> str:
    """One table: each step's status and time, then every latency row its jobs recorded."""
    lines = [f"{'step':<28}{'status':<11}{'s':>6}  detail"]
    lines += [f"{o.step.name:<28}{o.status:<11}{o.seconds:>6.0f}  {o.detail}" for o in outcomes]
    if not any(o.results for o in outcomes):
        return "\n".join(lines)
    lines += [
        "",
        f"{'row':<64}{'status':<8}{'metric':>10}{'prefill ms':>11}{'p50 ms':>9}{'tok/s':>9}{'x ref':>7}{'MiB':>8}"
        f"  {'attention kernel':<19}{'attn TF/s':>10}{'of mm':>7}",
    ]
    for outcome in outcomes:
        for results in outcome.results:
            metrics = results.get("metrics") or {}
            headline = (results.get("task") or {}).get("headline", "test/acc")
            for row in results.get("latency") or [{}]:
                name = " ".join(
                    str(row[k])
                    for k in ("seq_len", "attention", "quant", "variant", "backend", "device")
                    if k in row
                )
                ratio = row.get("ratio_to_float", row.get("ratio"))
                lines.append(
                    f"{outcome.step.name[:20] + ' ' + name:<64}{row.get('status', results['status']):<8}"
                    f"{_figure(metrics.get(headline)):>10}{_figure(row.get('prefill_p50_ms')):>11}"
                    f"{_figure(row.get('p50_ms'), 3):>9}{_figure(row.get('tokens_per_s'), 0):>9}"
                    f"{_figure(ratio):>7}{_figure((row.get('peak_memory_bytes') or 0) / 2**20, 0):>8}"
                    f"  {row.get('attention_kernel') or '-':<19}{_figure(row.get('attention_tflops'), 1):>10}"
                    f"{_figure(row.get('attention_flops_share')):>7}"
                )
    return "\n".join(lines)


def _figure(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_check"))
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("DATA") or REPO.parent / "shared" / "data")
    )
    parser.add_argument(
        "--steps", default=os.environ.get("STEPS", ""), help="comma-separated step names (default: all)"
    )
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN") == "1")
    args = parser.parse_args(argv)
    chosen = steps(args.out.resolve(), args.data.resolve())
    names = [n for n in args.steps.split(",") if n]
    unknown = sorted(set(names) - {s.name for s in chosen})
    if unknown:
        parser.error(f"STEPS names {unknown}; the steps are {[s.name for s in chosen]}")
    chosen = [s for s in chosen if not names or s.name in names]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcomes = []
    for step in chosen:
        outcome = dry_run(step) if args.dry_run else run(step, args.out)
        print(f"{step.name}: {outcome.status} ({outcome.seconds:.0f} s) {outcome.detail}", flush=True)
        outcomes.append(outcome)
    total = time.perf_counter() - started
    print(summary(outcomes))
    print(f"total {total:.0f} s (budget {BUDGET_S} s for all steps on one H100/H200)")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
