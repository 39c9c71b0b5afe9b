"""Attention: every implementation computes the same function, and impossible choices are refused early."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from qatflash.attention import (
    PADDED_BATCHES,
    TrainingCall,
    check_attention,
    check_mask_support,
    check_model_supports,
    forced_kernel,
)
from qatflash.config import AttentionConfig, to_config
from qatflash.errors import ConfigError
from qatflash.models import build_model

CPU = torch.device("cpu")
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 100,
}


def _bert(implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", num_labels=2, **TINY)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=implementation).eval()


def _padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("implementation", "kernel"),
    [("sdpa", None), ("sdpa", "math"), ("sdpa", "flash"), ("flex_attention", None)],
)
def test_implementations_match_eager_on_padded_batches(implementation: str, kernel: str | None) -> None:
    batch = _padded_batch()
    reference = _bert("eager")
    other = _bert(implementation)
    other.load_state_dict(reference.state_dict())
    with torch.no_grad(), forced_kernel(kernel):
        expected, got = reference(**batch).logits, other(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_2_without_the_package_names_the_extra(make_cfg) -> None:
    config = to_config(make_cfg("attention=flash_attention_2"))
    with pytest.raises(ConfigError) as info:
        check_attention(config.attention, "bf16-mixed", CPU)
    assert str(info.value).startswith("attention=flash_attention_2 needs the Python package 'flash_attn'")
    assert "pip install -e '.[flash]'" in str(info.value)


def test_flash_attention_2_needs_cuda_and_half_precision() -> None:
    needs = AttentionConfig(
        implementation="flash_attention_2", requires_cuda=True, requires_half_precision=True
    )
    with pytest.raises(ConfigError, match="needs a CUDA GPU, but this run is on cpu"):
        check_attention(needs, "bf16-mixed", CPU)
    with pytest.raises(ConfigError, match=r"needs fp16/bf16, but trainer.precision=32-true"):
        check_attention(needs, "32-true", torch.device("cuda"))


def test_forced_sdpa_kernel_missing_on_this_device_is_refused_with_what_exists() -> None:
    with pytest.raises(ConfigError) as info:
        check_attention(AttentionConfig(sdpa_backend="efficient"), "32-true", CPU)
    assert str(info.value) == (
        "attention.sdpa_backend=efficient has no kernel on cpu for torch.float32; available here: ['flash', 'math']"
    )
    check_attention(AttentionConfig(sdpa_backend="flash"), "32-true", CPU)


def test_a_forced_kernel_is_probed_as_training_calls_it_with_the_models_dropout() -> None:
    """CPU's flash kernel runs inference and trains without dropout, but takes no dropout: a model
    whose attention drops out is refused before training, the same model without dropout is not."""
    forced = AttentionConfig(sdpa_backend="flash")
    with pytest.raises(ConfigError) as info:
        check_attention(forced, "32-true", CPU, TrainingCall("attention_probs_dropout_prob", 0.1))
    assert str(info.value).startswith(
        "attention.sdpa_backend=flash takes no attention dropout on cpu, and training would pass this "
        "model's attention_probs_dropout_prob=0.1; set it to 0"
    )
    with pytest.raises(ConfigError, match="takes no attention dropout on cpu"):
        check_mask_support(forced, "32-true", CPU, PADDED_BATCHES, TrainingCall("attention_dropout", 0.1))
    check_attention(forced, "32-true", CPU, TrainingCall("attention_probs_dropout_prob", 0.0))
    check_attention(forced, "32-true", CPU)  # inference only (qatflash-bench): no dropout, no backward
    check_attention(AttentionConfig(sdpa_backend="math"), "32-true", CPU, TrainingCall("p", 0.1))


def test_model_without_sdpa_support_is_refused_before_loading() -> None:
    deberta = AutoConfig.for_model("deberta-v2", num_labels=2, **TINY)
    model_class = type(AutoModelForSequenceClassification.from_config(deberta))
    with pytest.raises(
        ConfigError,
        match=r"attention=sdpa is not supported by DebertaV2ForSequenceClassification; it supports \['eager'",
    ):
        check_model_supports(AttentionConfig(implementation="sdpa"), model_class)


def test_build_model_uses_the_chosen_implementation(make_cfg) -> None:
    config = to_config(make_cfg("attention=eager"))
    hf_config = AutoConfig.for_model("bert", num_labels=2, **TINY)
    model = build_model(config.model, config.attention, hf_config)
    assert model.config._attn_implementation == "eager"


@pytest.mark.needs("cuda")
def test_sdpa_flash_kernel_runs_on_cuda_in_bf16() -> None:
    cuda = torch.device("cuda")
    check_attention(AttentionConfig(sdpa_backend="flash"), "bf16-mixed", cuda)
    with pytest.raises(ConfigError, match="cannot take a padding mask on cuda"):
        check_mask_support(AttentionConfig(sdpa_backend="flash"), "bf16-mixed", cuda, PADDED_BATCHES)
    model = _bert("sdpa").cuda()
    batch = {k: v.cuda() for k, v in _padded_batch().items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), forced_kernel("flash"):
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # flash takes no padding mask
        assert model(**batch).logits.isfinite().all()


@pytest.mark.needs("cuda")
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_half_precision_kernels_forced_in_fp32_are_refused_on_cuda(backend: str) -> None:
    """Only a GPU shows it: CUDA's flash and cuDNN kernels exist for fp16/bf16 alone."""
    with pytest.raises(
        ConfigError, match=rf"sdpa_backend={backend} has no kernel on cuda for torch\.float32"
    ):
        check_attention(AttentionConfig(sdpa_backend=backend), "32-true", torch.device("cuda", 0))


def test_forced_kernel_without_mask_support_is_refused_only_for_masked_calls(
    monkeypatch, make_bench_cfg
) -> None:
    """CUDA's flash kernel takes no mask: fine for one-length inputs and a dynamic cache's decode,
    refused up front for padded batches and for a static cache's decode (the bench's check too)."""
    from qatflash import attention
    from qatflash.bench.app import check_bench

    real = attention._kernel_runs
    monkeypatch.setattr(
        attention,
        "_kernel_runs",
        lambda kernel, q, mask=None, *args, **kwargs: mask is None and real(kernel, q),
    )
    forced = AttentionConfig(sdpa_backend="flash")
    attention.check_mask_support(forced, "32-true", CPU, None)
    with pytest.raises(ConfigError, match="sdpa_backend=flash cannot take a padding mask on cpu"):
        attention.check_mask_support(forced, "32-true", CPU, attention.PADDED_BATCHES)
    decoder = ["task=causal_lm", "model=llama_tiny", "attention=sdpa_flash", "benchmark.new_tokens=4"]
    check_bench(to_config(make_bench_cfg(*decoder, "benchmark.kv_cache=dynamic")))
    with pytest.raises(
        ConfigError,
        match=r"^attention.sdpa_backend=flash cannot take the mask of a static KV cache on cpu, and "
        r"benchmark.kv_cache=static decodes through one; use attention.sdpa_backend=null",
    ):
        check_bench(to_config(make_bench_cfg(*decoder, "benchmark.kv_cache=static")))
