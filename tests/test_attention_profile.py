"""Each timed row names the attention kernel the profiler saw run, with the attention core's time,
FLOPs (counted by hand here) and share of the measured matmul; a forced SDPA kernel is the one
timed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_bench import QUICK
from transformers import LlamaConfig, LlamaForCausalLM

from qatflash.bench.app import run_benchmark
from qatflash.config import TimingConfig, to_config
from qatflash.job import JobContext
from qatflash.timing.attention_profile import (
    UNRECOGNIZED,
    AttentionProfile,
    add_attention,
    attention_modules,
    kernel_of,
    profile_attention,
)
from qatflash.timing.latency import Contender, timing_mode

CPU = torch.device("cpu")
ONE_POINT = [*QUICK, "bench.isolate=false", "bench.seq_lens=[64]"]


def _row(make_bench_cfg, folder: Path, *overrides: str) -> dict:
    config = to_config(make_bench_cfg(*ONE_POINT, *overrides))
    (row,) = run_benchmark(config, JobContext(folder=folder, choices={}))["latency"]
    return row


@pytest.mark.parametrize(
    ("attention", "kernel", "event"),
    [
        (["attention=eager"], "eager", "aten::_softmax"),
        (["attention=sdpa"], "flash", "aten::_scaled_dot_product_flash_attention_for_cpu"),
        # a forced kernel is the one timed (the benchmark once timed PyTorch's own choice under every name)
        (
            ["attention=sdpa", "attention.sdpa_backend=math"],
            "math",
            "aten::_scaled_dot_product_attention_math",
        ),
    ],
)
def test_a_benchmark_row_names_the_kernel_that_ran_and_its_throughput(
    make_bench_cfg, tmp_path: Path, attention: list[str], kernel: str, event: str
) -> None:
    row = _row(make_bench_cfg, tmp_path, *attention)
    assert (row["attention_kernel"], row["attention_kernel_event"]) == (kernel, event)
    # tiny_bert at 64 tokens, batch 1: 2 layers x 2 heads of 64, every pair (not causal), 2 x 2 FLOPs
    assert row["attention_flops"] == 2 * 2 * 2 * 2 * 64 * 64 * 64
    # both from the profiled forward (the profiler's overhead weighs on eager's many small operators)
    assert 0 < row["attention_share_of_forward"] < 1
    assert row["attention_tflops"] == pytest.approx(row["attention_flops"] / row["attention_ms"] / 1e9)
    assert row["attention_flops_share"] == pytest.approx(row["attention_tflops"] / row["matmul_tflops"])
    assert len(row["attention_costliest_ms"]) == 3


def test_a_causal_decoders_attention_counts_half_the_pairs(make_bench_cfg, tmp_path: Path) -> None:
    row = _row(
        make_bench_cfg,
        tmp_path,
        "task=causal_lm",
        "model=llama_tiny",
        "model.arch.num_hidden_layers=2",
        "bench.batch_sizes=[2]",
    )
    config = LlamaConfig(**to_config(make_bench_cfg("model=llama_tiny")).model.arch)
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    assert row["attention_flops"] == 2 * 2 * 2 * heads * head_dim * 2 * 64 * 64 // 2
    assert row["attention_kernel"] == "flash"


def _llama(implementation: str, **config: float) -> LlamaForCausalLM:
    config = LlamaConfig(
        **config,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        attn_implementation=implementation,
    )
    return LlamaForCausalLM(config).eval()


def _profile(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> AttentionProfile:
    contender = Contender(model, CPU)
    with timing_mode({"float": contender}, TimingConfig()):
        return profile_attention(contender, inputs)


def test_a_model_left_in_training_mode_is_profiled_as_it_was_timed() -> None:
    """A fit leaves its model in training mode; profiled so, its attention dropout would run and
    SDPA would take the math kernel on a CPU where the timed forward (eval mode) took flash."""
    model = _llama("sdpa", attention_dropout=0.5).train()
    seen: list[tuple[bool, bool, int]] = []
    model.register_forward_pre_hook(
        lambda m, _: seen.append((m.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
    )
    figures: dict[str, dict] = {"float": {}}
    inputs = {"input_ids": torch.randint(0, 128, (1, 64))}
    timing = TimingConfig(threads=1)
    add_attention(figures, {"float": Contender(model, CPU)}, {}, model.config, inputs, True, timing)
    assert seen == [(False, True, 1)]  # eval mode, inference mode, the timing's threads
    assert figures["float"]["attention_kernel"] == "flash"
    assert "aten::bernoulli_" not in figures["float"]["attention_costliest_ms"]
    assert model.training  # given back as it came


def test_the_attention_core_leaves_out_the_projections() -> None:
    model = _llama("eager")
    assert [type(m).__name__ for m in attention_modules(model)] == ["LlamaAttention"] * 2
    found = _profile(model, {"input_ids": torch.randint(0, 128, (1, 96))})
    assert found.kernel == "eager" and found.core_ms > 0
    # inside the attention modules less their q/k/v/o projections: no Linear's matmul
    assert "aten::bmm" in found.costliest
    assert not {"aten::addmm", "aten::mm", "aten::linear"} & set(found.costliest)


def test_a_compiled_model_is_named_from_all_its_events_without_a_core_time() -> None:
    """A compiled model's modules run as one graph: no range can delimit its attention."""
    model = torch.compile(_llama("sdpa"), backend="eager")
    found = _profile(model, {"input_ids": torch.randint(0, 128, (1, 32))})
    assert found.kernel == "flash" and found.core_ms is None


@pytest.mark.parametrize(
    ("names", "kernel"),
    [
        # as CUDA profiles name them: the dispatched operator, then its kernel
        (
            [
                "aten::_scaled_dot_product_cudnn_attention",
                "cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
            ],
            "cudnn",
        ),
        (["aten::_scaled_dot_product_flash_attention", "pytorch_flash::flash_fwd_kernel<>"], "flash"),
        (
            ["aten::_scaled_dot_product_efficient_attention", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"],
            "efficient",
        ),
        (["aten::_scaled_dot_product_attention_math", "aten::bmm", "aten::_softmax"], "math"),
        (["flash_attn::_flash_attn_forward", "flash_fwd_kernel"], "flash_attn_package"),
        (["## Call CompiledFxGraph abc ##", "triton_tem_fused_0"], "flex_triton"),
        (["## Call CompiledFxGraph abc ##", "aten::mul"], "inductor_graph"),
        (["aten::bmm", "aten::_softmax", "aten::mul"], "eager"),
        (["aten::bmm", "aten::mul"], UNRECOGNIZED),
    ],
)
def test_profiler_names_are_read_as_the_kernel_they_show(names: list[str], kernel: str) -> None:
    assert kernel_of(names)[0] == kernel


class _Sleeper(torch.nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return hidden


class ToyAttention(torch.nn.Module):
    """An attention whose projection (a child) takes 60 ms and whose own body about 10 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = _Sleeper(0.06)
        self.body = 0.01

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.projection(input_ids.float())
        time.sleep(self.body)
        return torch.softmax(hidden, dim=-1)


def test_the_core_time_is_the_attention_less_its_childrens_time() -> None:
    found = _profile(ToyAttention(), {"input_ids": torch.ones(1, 8)})
    assert found.kernel == "eager"
    assert 10 <= found.core_ms < 40  # the body's 10 ms, not the projection's 60 on top
