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
from qatflash.timing.generation import (
    CompiledDecoder,
    Decoder,
    compiled_graphs,
    full_sequence_logits,
    generate,
    kv_cache_bytes,
    profile_decode,
)
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
        generated = generate(Decoder(model, kv_cache), prompt, 32)
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


def test_compiled_decode_gives_eagers_tokens_from_one_graph() -> None:
    """Compiled decode over a static cache chooses the tokens eager decode chooses (logits to 1e-5)
    from one dynamo graph for every step of two generations: no recompilation per token (the
    position is a tensor), nor per generation. Both generations use the one cache, reset: on the CPU
    a new one would not recompile, but under CUDA graphs its new addresses re-record the graph."""
    model, prompt = _decoder(), torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        eager = generate(Decoder(model, "static"), prompt, 12)
        compiled = CompiledDecoder(model, torch.device("cpu"))
        before = compiled_graphs()
        runs = [generate(compiled, prompt, 12) for _ in range(2)]
        assert compiled_graphs() - before == 1
    assert runs[0].cache is runs[1].cache is compiled.cache
    assert len(torch.unique(eager.tokens)) > 1
    for generated in runs:
        assert torch.equal(generated.tokens, eager.tokens)
        torch.testing.assert_close(
            torch.stack(generated.logits), torch.stack(eager.logits), rtol=0, atol=1e-5
        )


def test_a_decode_step_that_breaks_the_graph_is_refused_in_one_line() -> None:
    model = _decoder()
    model.model.layers[0].register_forward_hook(lambda *_: torch._dynamo.graph_break())
    with (
        torch.inference_mode(),
        pytest.raises(
            ConfigError,
            match=r"decode=compiled: LlamaForCausalLM's decode step does not compile into one graph",
        ),
    ):
        generate(CompiledDecoder(model, torch.device("cpu")), torch.zeros(1, 4, dtype=torch.long), 2)


def test_kv_cache_bytes_are_keys_and_values_of_every_layer() -> None:
    """2 (keys, values) x layers x batch x kv heads x positions x head dim x 4 bytes; a static cache
    holds its whole preallocation, none holds nothing."""
    model, prompt = _decoder(layers=3, kv_heads=2), torch.zeros(2, 10, dtype=torch.long)
    with torch.inference_mode():
        dynamic = generate(Decoder(model, "dynamic"), prompt, 5)
        static = generate(Decoder(model, "static"), prompt, 5)
        none = generate(Decoder(model, "none"), prompt, 5)
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
        generate(Decoder(model, "dynamic"), torch.zeros(1, 6, dtype=torch.long), 3)
        assert seen == [6, 1, 1, 1]
        seen.clear()
        generate(Decoder(model, "none"), torch.zeros(1, 6, dtype=torch.long), 3)
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
        # the prompt's forward, profiled: 2 x 2 FLOPs x 2 layers x 2 heads of 32 x batch 2 x 24^2 / 2
        assert (
            row["attention_kernel"] == "flash" and row["attention_flops"] == 4 * 2 * 2 * 32 * 2 * 24 * 24 // 2
        )
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


def test_a_benchmark_point_times_compiled_decode_beside_eager_against_the_devices_ceilings(
    make_bench_cfg, tmp_path: Path
) -> None:
    """decode=compiled: each model's compiled decode (one graph, none while timed) beside its eager
    decode, paired; every row's bytes per token and prefill FLOPs, counted by hand for the tiny
    decoder (hidden 64, FFN 128, 2 layers of 2 heads of 32 and 1 KV head, vocabulary 512, untied),
    against the copy and matmul this process measured."""
    rows = _bench(
        make_bench_cfg,
        tmp_path,
        "quant=wo_packed_int8",
        "bench.seq_lens=[16]",
        "benchmark.new_tokens=4",
        "benchmark.kv_cache=static",
        "benchmark.decode=compiled",
    )["latency"]
    float_row, quantized = rows
    for row in rows:
        assert row["decode"] == "eager+compiled" and row["compiled_p50_ms"] > 0
        assert row["compiled_graphs"] == 1 and row["compiled_graphs_while_timed"] == 0
        assert row["compiled_rounds_to_eager"] >= 2
        # keys and values: 2 x 2 layers x 1 KV head x 32 x 4 bytes per position, at the mean context
        # of 4 decode steps after 16 prompt tokens: 16 + 5 / 2
        assert row["kv_read_bytes"] == 2 * 2 * 32 * 4 * 18.5
        assert row["bytes_per_token"] == row["weights_read_bytes"] + row["kv_read_bytes"]
        assert row["decode_gb_per_s"] == pytest.approx(row["bytes_per_token"] / row["p50_ms"] / 1e6)
        assert row["decode_bandwidth_share"] == pytest.approx(row["decode_gb_per_s"] / row["copy_gb_per_s"])
        assert row["compiled_gb_per_s"] == pytest.approx(
            row["bytes_per_token"] / row["compiled_p50_ms"] / 1e6
        )
        # Linears 2 x 16 tokens x 2 layers x 36,864 weights, the head 2 x 1 x 32,768, attention
        # 2 x 2 x 2 layers x 2 heads x 32 x 16^2 / 2
        assert row["prefill_flops"] == 2 * 16 * 2 * 36864 + 2 * 32768 + 4 * 2 * 2 * 32 * 16 * 16 // 2
        assert row["prefill_flops_share"] == pytest.approx(row["prefill_tflops"] / row["matmul_tflops"])
        assert row["matmul_dtype"] == "float32" and row["copy_bytes"] == 2**28
    # float32: every parameter (139,584) but the embedding table, less the one row a step looks up
    assert float_row["weights_read_bytes"] == 4 * (139584 - 512 * 64 + 64)
    # int8 Linears (73,728 + the head's 32,768) with a float32 scale per output row (2 x 512 + the head's 512),
    # float32 norms (2 x 128 + 64) and the embedding row
    assert quantized["weights_read_bytes"] == (73728 + 32768) + 4 * (2 * 512 + 512) + 4 * (2 * 128 + 64 + 64)
    assert quantized["compiled_rounds_to_float"] >= 2 and "compiled_ratio_to_float" in quantized


def test_a_slow_schemes_breakdown_names_its_kernel() -> None:
    """The profile of a weight-only int8 decoder's decode steps shows where the time went: the
    packed int8 matmul, and none of the prefill that came before the profiler started."""
    model = _decoder()
    recipe = PackedRecipe(to_config_quant("wo_packed_int8"))
    quantized = recipe.convert(recipe.prepare(model))
    ops = {
        op["op"]: op
        for op in profile_decode(Decoder(quantized, "dynamic"), torch.zeros(1, 8, dtype=torch.long), 4)
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
            ["benchmark.new_tokens=4", "benchmark.decode=compiled"],
            r"benchmark.decode=compiled with benchmark.kv_cache=dynamic: a compiled step needs shapes",
        ),
        (
            ["benchmark.decode=compiled"],
            r"benchmark.decode=compiled times decode steps: set benchmark.new_tokens > 0",
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


def test_the_7b_shape_is_refused_on_a_host_without_its_memory_before_a_weight_is_built(
    make_bench_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model=llama_7b_shape on a CPU host of CI's size (24 GiB available): 6.74B float32 parameters
    need 25.1 GiB, refused naming it; in bfloat16 (12.6 GiB) it passes the check. Nothing is built."""
    from qatflash import models
    from qatflash.bench.app import check_bench

    monkeypatch.setattr(models, "host_memory_available", lambda: 24 * 2**30)
    monkeypatch.setattr(models, "build_model_from_config", lambda *_: pytest.fail("a weight was built"))
    cfg = lambda dtype: to_config(  # noqa: E731
        make_bench_cfg("task=causal_lm", "model=llama_7b_shape", "logger=none", f"bench.dtype={dtype}")
    )
    with pytest.raises(
        ConfigError,
        match=r"^bench.device=cpu bench.dtype=float32: the model's 6.74B parameters need 25.1 GiB as float32 "
        r"weights alone; this host has 24.0 GiB available: run it on a GPU",
    ):
        run_benchmark(cfg("float32"), JobContext(folder=tmp_path, choices={}))
    assert check_bench(cfg("bfloat16")).num_hidden_layers == 32


def test_host_memory_available_reads_this_machine() -> None:
    from qatflash.models import host_memory_available

    assert 2**28 < host_memory_available() < 2**50


def test_a_config_built_model_is_made_on_its_device_in_its_dtype() -> None:
    """Every weight born in bfloat16: no float32 copy first (the 7B shape's would be 25 GiB)."""
    from qatflash.config import AttentionConfig
    from qatflash.models import build_model_from_config

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    created: list[torch.dtype] = []
    original = torch.nn.Linear.reset_parameters
    torch.nn.Linear.reset_parameters = lambda self: (created.append(self.weight.dtype), original(self))[1]
    try:
        model = build_model_from_config(
            config, AttentionConfig(), AutoModelForCausalLM, torch.device("cpu"), torch.bfloat16
        )
    finally:
        torch.nn.Linear.reset_parameters = original
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert created and set(created) == {torch.bfloat16}
