"""Sequence classification: any `AutoModelForSequenceClassification` on labelled sentences, judged by accuracy."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from qatflash.data import TextClassificationData
from qatflash.models import load_tokenizer, model_config
from qatflash.module import SequenceClassifier
from qatflash.tasks.task import Task
from qatflash.timing.latency import token_inputs


class ClassificationTask(Task):
    data_kind = "classification"
    headline = "test/acc"
    quality = "accuracy"
    auto_model = AutoModelForSequenceClassification

    def data_module(self) -> TextClassificationData:
        return TextClassificationData(self.cfg.data, partial(load_tokenizer, self.cfg.model), self.cfg.seed)

    def model_config(self, data: TextClassificationData) -> PretrainedConfig:
        return model_config(self.cfg.model, data.num_labels, vocab_size=len(data.tokenizer))

    def lightning_module(self, model: nn.Module, data: TextClassificationData) -> SequenceClassifier:
        return SequenceClassifier(model, self.cfg.optim, data.num_labels, self.cfg.attention.sdpa_backend)

    def example_inputs(self, data: TextClassificationData) -> dict[str, torch.Tensor]:
        return {k: v for k, v in next(iter(data.test_dataloader())).items() if k != "labels"}

    @staticmethod
    def timing_inputs(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
        """A forward over (batch_size, seq_len) seeded random token ids, no padding."""
        return token_inputs(batch_size, seq_len, vocab_size)
