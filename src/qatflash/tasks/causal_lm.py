"""Causal language modelling: any `AutoModelForCausalLM` on running text, judged by test perplexity.

A model built from a config (`model=llama_tiny`, `qwen2_tiny`) trains from scratch with a byte-level
BPE tokenizer learnt from the training split; a pretrained one (`model.name_or_path`: hub id or
folder) brings its own tokenizer. Every result is recorded beside a baseline the project computes
itself, an add-one unigram model of the training words scored on the same test words.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from qatflash.config import ModelConfig, TimingConfig
from qatflash.data.language_modeling import LanguageModelingData
from qatflash.errors import require
from qatflash.language_model import CausalLanguageModel
from qatflash.models import load_tokenizer, model_config, train_bpe
from qatflash.quant.recipe import Recipe
from qatflash.tasks.task import Task
from qatflash.timing.latency import token_inputs

LM_HEAD = "lm_head"


def lm_tokenizer(cfg: ModelConfig, training_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """The model's tokenizer, or a BPE trained on the texts; one without padding pads with EOS
    (padding only fills a split's last window, whose padded labels are never scored)."""
    tokenizer = load_tokenizer(cfg, training_texts, train=train_bpe)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class CausalLMTask(Task):
    data_kind = "causal_lm"
    headline = "test/ppl"
    higher_is_better = False
    quality = "ppl"
    auto_model = AutoModelForCausalLM
    attends_causally = True

    @classmethod
    def check_timing(cls, timing: TimingConfig, recipe: Recipe | None) -> None:
        """Generation feeds a KV cache to the model's own forward, which eager torch runs; an exported
        or compiled forward (onnxruntime, torch_compile, a pt2e INT8 program) takes none."""
        if timing.new_tokens == 0:
            return
        require(
            list(timing.backends) == ["torch"],
            f"benchmark.backends={list(timing.backends)} with benchmark.new_tokens={timing.new_tokens}: "
            "generation with a KV cache runs through eager torch only; use benchmark.backends=[torch]",
        )
        require(
            recipe is None or not recipe.compiled_only,
            f"quant.api={recipe.cfg.api if recipe else None} runs its INT8 only as a compiled one-forward "
            "program, which cannot decode with a KV cache; use benchmark.new_tokens=0 with it",
        )

    def data_module(self) -> LanguageModelingData:
        return LanguageModelingData(self.cfg.data, partial(lm_tokenizer, self.cfg.model), self.cfg.seed)

    def model_config(self, data: LanguageModelingData) -> PretrainedConfig:
        tokenizer = data.tokenizer
        ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "pad")}
        config = model_config(self.cfg.model, 2, vocab_size=len(tokenizer), **ids)
        # Training and scoring forwards keep no KV cache; generation asks for one itself.
        config.use_cache = False
        return config

    def lightning_module(self, model: nn.Module, data: LanguageModelingData) -> CausalLanguageModel:
        return CausalLanguageModel(
            model, self.cfg.optim, self.cfg.attention.sdpa_backend, data.test_words, data.test_tokens
        )

    def example_inputs(self, data: LanguageModelingData) -> dict[str, torch.Tensor]:
        return {"input_ids": next(iter(data.test_dataloader()))["input_ids"]}

    @staticmethod
    def timing_inputs(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
        """One forward over (batch_size, seq_len) seeded random token ids (the prefill of a prompt)."""
        return {"input_ids": token_inputs(batch_size, seq_len, vocab_size)["input_ids"]}

    def baseline_metrics(self, data: LanguageModelingData) -> dict[str, float]:
        return {"baseline/unigram_word_ppl": data.unigram_word_ppl}

    def model_facts(self, hf_config: PretrainedConfig, recipe: Recipe | None) -> dict[str, Any]:
        """Whether the LM head shares the embedding table (its bytes then count once: torch.save
        stores a shared tensor once) and whether the head and the table are quantized."""
        return {
            "tied_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
            "lm_head_quantized": recipe is not None and LM_HEAD in recipe.targets,
            "embeddings_quantized": recipe is not None and recipe.cfg.embeddings == "int8",
        }
