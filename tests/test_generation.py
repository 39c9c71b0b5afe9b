"""Generation timing for causal LMs: the KV cache reproduces full-forward logits, its bytes are
accounted, prefill/decode rows in jobs and benchmarks (cache on/off, batch > 1), the weight-only
recipes end to end on a tiny decoder, the profiler breakdown, and the refusals."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import LM_FAST, TINY_DECODER, LearnedDecoder
from transformers import AutoModelForCausalLM, LlamaConfig

from qatflash.bench.app import run_benchmark
from qatflash.config import TimingConfig, to_config
from qatflash.errors import ConfigError
from qatflash.job import JobContext
from qatflash.pipeline import run
from qatflash.quant import make_recipe
from qatflash.quant.weight_only import (
    BitsAndBytesRecipe,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    PackedRecipe,
)
from qatflash.report import write_report
from qatflash.report.figures import quality_vs_latency
from qatflash.timing.generation import full_sequence_logits, generate, kv_cache_bytes, profile_decode
from qatflash.timing.latency import time_in_rounds

CHOICES = {"task": "causal_lm", "model": "llama_tiny", "data": "text"}
QUICK_TIMING = ["benchmark.warmup=1", "benchmark.min_iters=2", "benchmark.min_duration_s=0"]


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_cached_decode_reproduces_the_full_forward(learned_decoder: LearnedDecoder, kv_cache: str) -> None:
    """32 greedy tokens decoded from the cache give, at every step, the logits one forward over
    prompt + tokens gives (to 1e-5), on both decoder families."""
    model = AutoModelForCausalLM.from_pretrained(learned_decoder.folder).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        generated = generate(model, prompt, 32, kv_cache)
        full = full_sequence_logits(model, prompt, generated)
    cached = torch.stack(generated.logits, dim=1)
    assert cached.shape == full.shape == (2, 33, model.config.vocab_size)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    assert len(torch.unique(generated.tokens)) > 1  # a learned model, not one repeated token


def _decoder(layers: int = 2, kv_heads: int = 2, head_dim: int = 16) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=4 * head_dim,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_kv_cache_bytes_are_keys_and_values_of_every_layer() -> None:
    """2 (keys, values) x layers x batch x kv heads x positions x head dim x 4 bytes; a static cache
    holds its whole preallocation, none holds nothing."""
    model, prompt = _decoder(layers=3, kv_heads=2), torch.zeros(2, 10, dtype=torch.long)
    with torch.inference_mode():
        dynamic = generate(model, prompt, 5, "dynamic")
        static = generate(model, prompt, 5, "static")
        none = generate(model, prompt, 5, "none")
    per_position = 2 * 3 * 2 * 2 * 16 * 4
    assert kv_cache_bytes(dynamic.cache) == per_position * (10 + 5)  # the last token is never fed back
    assert kv_cache_bytes(static.cache) == per_position * (10 + 5)  # allocated up front, all used
    assert none.cache is None and kv_cache_bytes(none.cache) == 0
    assert torch.equal(dynamic.tokens, none.tokens) and torch.equal(static.tokens, none.tokens)


def test_decode_feeds_one_token_with_a_cache_and_the_whole_sequence_without() -> None:
    model, seen = _decoder(), []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.inference_mode():
        generate(model, torch.zeros(1, 6, dtype=torch.long), 3, "dynamic")
        assert seen == [6, 1, 1, 1]
        seen.clear()
        generate(model, torch.zeros(1, 6, dtype=torch.long), 3, "none")
    assert seen == [6, 7, 8, 9]


def test_rounds_stop_at_the_time_budget_after_two_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 0.0}

    def step() -> None:
        clock["now"] += 1.0  # a one-second forward

    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    cfg = TimingConfig(warmup=0, min_iters=1000, min_duration_s=0, block_iters=2, max_duration_s=3.0)
    timed = time_in_rounds({"a": (step, torch.device("cpu")), "b": (step, torch.device("cpu"))}, cfg, 8)
    # the budget ran out within round 1, but a paired ratio needs 2 rounds: 2 blocks of 2 each
    assert timed["a"].stats.iters == timed["b"].stats.iters == 4
    assert len(timed["a"].block_medians_ms) == 2


def test_generation_rounds_stop_at_the_time_budget_and_use_the_cache_asked_for() -> None:
    from qatflash.timing.generation import generation_rounds
    from qatflash.timing.latency import Contender

    cfg = TimingConfig(min_iters=1000, min_duration_s=0, max_duration_s=1e-9, new_tokens=3, kv_cache="none")
    contenders = {
        "a": Contender(_decoder(), torch.device("cpu")),
        "b": Contender(_decoder(), torch.device("cpu")),
    }
    times = generation_rounds(contenders, cfg, torch.zeros(1, 6, dtype=torch.long))
    for timed in times.values():
        assert timed.prefill.stats.iters == 2 and timed.decode.stats.iters == 2 * 3
        assert len(timed.decode.block_medians_ms) == 2
        assert timed.kv_cache_bytes == 0  # the cache asked for: none


def test_int4_group_sizes_the_kernel_does_not_take_are_refused() -> None:
    from qatflash.config import QuantConfig, WeightOnlyConfig

    cfg = QuantConfig(method="ptq_weight_only", api="packed", weight_only=WeightOnlyConfig("int4", 32))
    cfg.weight_only = WeightOnlyConfig("int4", 16)
    with pytest.raises(
        ConfigError, match=r"group_size=16: quant\.api=packed's int4 kernel takes \[32, 64, 128, 256\]"
    ):
        PackedRecipe.check_config(cfg)


def test_packed_int4_ships_the_configured_group_size() -> None:
    """One scale and zero per 32 input channels of every output row, as configured (the LM head's
    97 outputs are no multiple of the kernel's 16, so it stays float)."""
    cfg = to_config_quant("wo_packed_int4")
    assert cfg.weight_only.group_size == 32
    cfg.targets.exclude.append("lm_head")
    recipe = PackedRecipe(cfg)
    quantized = recipe.convert(recipe.prepare(_decoder()))
    modules = [m for m in quantized.modules() if isinstance(m, Int4WeightOnlyLinear)]
    assert len(modules) == 14  # 7 block Linears x 2 layers
    for module in modules:
        assert module.group_size == 32
        assert module.scales_and_zeros.shape == (module.in_features // 32, module.out_features, 2)


def test_packed_int8_scales_each_output_channel_by_its_own_largest_weight() -> None:
    linear = torch.nn.Linear(16, 6)
    with torch.no_grad():
        linear.weight.mul_(torch.arange(1, 7).unsqueeze(1))  # rows of different ranges
    module = Int8WeightOnlyLinear(linear)
    expected = linear.weight.detach().abs().amax(dim=1) / 127
    assert module.scales.shape == (6,)
    torch.testing.assert_close(module.scales, expected)
    dequantized = module.weight_int8.float() * module.scales[:, None]
    assert bool(((dequantized - linear.weight).abs() <= module.scales[:, None] / 2 + 1e-7).all())


def _lm_job(make_cfg, corpus: Path, folder: Path, *overrides: str) -> dict:
    cfg = to_config(
        make_cfg(
            *LM_FAST, "model=llama_tiny", *TINY_DECODER, f"data.path={corpus}", "logger=none", *overrides
        )
    )
    choices = {
        **CHOICES,
        "quant": cfg.quant.api,
        "attention": cfg.attention.implementation,
    }  # as Hydra records them
    return run(cfg, JobContext(folder=folder, choices=choices))


def test_a_job_times_prefill_and_decode_of_fp32_and_int8_side_by_side(
    make_cfg, text_corpus: Path, tmp_path: Path
) -> None:
    results = _lm_job(
        make_cfg,
        text_corpus,
        tmp_path,
        "quant=wo_packed_int8",
        "trainer.max_steps=2",
        "benchmark.new_tokens=4",
        "benchmark.batch_size=2",
        "benchmark.seq_len=24",
    )
    assert results["status"] == "ok", results["error"]
    rows = {row["variant"]: row for row in results["latency"]}
    assert set(rows) == {"float", "quantized"}
    for row in rows.values():
        assert row["scenario"] == "generate" and row["seq_len"] == 24 and row["batch_size"] == 2
        # decode samples are per token (4 per generation), prefill's per generation
        assert row["prefill_iters"] >= 2 and row["iters"] == 4 * row["prefill_iters"]
        assert row["tokens_per_s"] == pytest.approx(2 * 1000 / row["p50_ms"])  # generated tokens, both rows
        assert row["prefill_tokens_per_s"] == pytest.approx(2 * 24 * 1000 / row["prefill_p50_ms"])
        assert row["kv_cache_bytes"] == 2 * 2 * 2 * 1 * (24 + 4) * 32 * 4
    int8 = rows["quantized"]
    assert int8["ratio_reference"] == int8["prefill_ratio_reference"] == "float/torch"
    assert int8["ratio_to_float"] > 0 and int8["prefill_ratio_to_float"] > 0
    assert results["model"]["quantized_modules"] == 2 * 7 + 1  # every block Linear and the LM head

    # The report reads it as perplexity against decode per token, with prefill in a second panel.
    report = write_report([tmp_path], tmp_path / "report")
    figure = quality_vs_latency(pd.read_csv(report.folder / "results.csv"))
    assert [ax.get_xlabel().split(" /")[0] for ax in figure.axes] == [
        "decode latency per token",
        "prefill latency",
    ]
    assert "shipped / float prefill (paired)" in (report.folder / "report.md").read_text()


def _bench(make_bench_cfg, folder: Path, *overrides: str) -> dict:
    cfg = to_config(
        make_bench_cfg(
            "task=causal_lm",
            "model=llama_tiny",
            *TINY_DECODER,
            "logger=none",
            "bench.isolate=false",
            "bench.seq_lens=[64]",
            *QUICK_TIMING,
            *overrides,
        )
    )
    return run_benchmark(cfg, JobContext(folder=folder, choices={"quant": cfg.quant.method}))


def test_a_benchmark_point_times_a_quantized_decoder_beside_its_float_one(
    make_bench_cfg, tmp_path: Path
) -> None:
    results = _bench(
        make_bench_cfg,
        tmp_path,
        "quant=wo_packed_int4",
        "bench.seq_lens=[16,64]",
        "benchmark.new_tokens=4",
        "benchmark.kv_cache=static",
    )
    rows = results["latency"]
    assert [(r["seq_len"], r["variant"]) for r in rows] == [
        (16, "float"),
        (16, "quantized"),
        (64, "float"),
        (64, "quantized"),
    ]
    for float_row, quantized in (rows[:2], rows[2:]):
        assert quantized["weight_bytes"] < 0.6 * float_row["weight_bytes"]
        assert quantized["rounds_to_float"] >= 2 and quantized["prefill_rounds_to_float"] >= 2
        # the static cache: 2 x 2 layers x 1 KV head x (prompt + 4 new) x head dim 32 x 4 bytes
        length = float_row["seq_len"] + 4
        assert quantized["kv_cache_bytes"] == float_row["kv_cache_bytes"] == 2 * 2 * 1 * length * 32 * 4
        assert "peak_memory_bytes" in float_row and quantized["kv_cache"] == "static"
        slower = quantized["ratio_to_float"] > 1
        assert ("profile" in quantized) == slower and ("profile" in float_row) == slower

    report = write_report([tmp_path], tmp_path / "report")
    assert report.folder / "generation.png" in report.files
    assert report.folder / "scaling.png" not in report.files  # no forward was timed
    markdown = (report.folder / "report.md").read_text()
    assert "prefill p50 ms" in markdown and "quantized / float (paired)" in markdown


def test_a_slow_schemes_breakdown_names_its_kernel() -> None:
    """The profile of a weight-only int8 decoder's decode steps shows where the time went: the
    packed int8 matmul, and none of the prefill that came before the profiler started."""
    model = _decoder()
    recipe = PackedRecipe(to_config_quant("wo_packed_int8"))
    quantized = recipe.convert(recipe.prepare(model))
    ops = {
        op["op"]: op for op in profile_decode(quantized, torch.zeros(1, 8, dtype=torch.long), 4, "dynamic")
    }
    assert "aten::_weight_int8pack_mm" in ops
    # 4 decode steps x (7 block Linears x 2 layers + the LM head); prefill's 15 calls are not counted
    assert ops["aten::_weight_int8pack_mm"]["calls"] == 4 * 15


def to_config_quant(name: str):
    from omegaconf import OmegaConf

    from qatflash.config import QuantConfig

    path = Path(__file__).parents[1] / "conf" / "quant" / f"{name}.yaml"
    loaded = OmegaConf.load(path)
    loaded.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantConfig), loaded))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant=gptq"], r"quant.api=gptq: GPTQ's kernels are CUDA-only, and no maintained implementation"),
        # as on a machine where flash-attn is installed: the CUDA check is what refuses it here
        (
            ["attention=flash_attention_2", "attention.requires_module=null"],
            "attention=flash_attention_2 needs a CUDA GPU, but this run is on cpu",
        ),
        (["quant=ptq_static"], r"quant.method=ptq_static needs data \(calibration or training\)"),
        (
            ["benchmark.new_tokens=4", "benchmark.backends=[torch_compile]"],
            "generation with a KV cache runs through eager torch only",
        ),
        (
            ["bench.seq_lens=[250]", "benchmark.new_tokens=8"],
            r"bench.seq_lens \+ benchmark.new_tokens holds \[258\], beyond the model's position limit 256",
        ),
    ],
)
def test_bench_refusals(make_bench_cfg, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _bench(make_bench_cfg, tmp_path, *overrides)


def test_generation_is_refused_for_classification(make_bench_cfg, tmp_path: Path) -> None:
    cfg = to_config(make_bench_cfg("model=tiny_bert", "logger=none", "benchmark.new_tokens=4"))
    with pytest.raises(
        ConfigError, match=r"benchmark\.new_tokens=4 times generation, which task=classification does not do"
    ):
        run_benchmark(cfg, JobContext(folder=tmp_path, choices={}))


def test_packed_kernels_are_refused_on_cuda() -> None:
    with pytest.raises(
        ConfigError,
        match=r"quant\.api=packed makes int4_wo_packed, whose kernels run on \['cpu'\]; bench\.device=cuda has none",
    ):
        make_recipe(to_config_quant("wo_packed_int4")).check_device("cuda")


@pytest.mark.needs("bnb")
def test_bitsandbytes_is_refused_without_a_backend_for_the_device_or_without_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(
        ConfigError,
        match=r"quant\.api=bitsandbytes makes nf4_wo_bnb, whose kernels run on \['cuda'\]; bench\.device=cpu has none",
    ):
        make_recipe(to_config_quant("wo_bnb_nf4")).check_device("cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package: pip install 'qatflash\[bnb\]'"):
        BitsAndBytesRecipe.check_config(to_config_quant("wo_bnb_nf4"))


def test_a_job_refuses_generation_it_cannot_time(make_cfg, text_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"quant\.api=pt2e runs its INT8 only as a compiled one-forward program"
    ):
        _lm_job(make_cfg, text_corpus, tmp_path, "quant=qat_pt2e_x86", "benchmark.new_tokens=4")


def test_on_cuda_each_step_is_timed_by_events_read_after_one_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's Event and synchronize replaced at that boundary only: every prefill and decode step
    gets its own pair of events, and none is read before the device is synchronised."""
    from qatflash.timing.generation import _PhaseClock

    device = {"ms": 0.0, "synced": False}

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at = 0.0

        def record(self) -> None:
            self.at = device["ms"]

        def elapsed_time(self, end: Event) -> float:
            assert device["synced"], "an event read before the device was synchronised"
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    syncs: list[None] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda _=None: syncs.append(device.update(synced=True)))
    clock = _PhaseClock(torch.device("cuda"))

    def work(ms: float):
        def step() -> torch.Tensor:
            device["ms"] += ms
            return torch.zeros(1)

        return step

    clock("prefill", work(30.0))
    for ms in (2.0, 3.0, 4.0):
        clock("decode", work(ms))
    assert clock.samples() == {"prefill": [30.0], "decode": [2.0, 3.0, 4.0]}
    assert syncs == [None]  # once, after the generation: never between its steps
