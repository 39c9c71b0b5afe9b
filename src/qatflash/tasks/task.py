"""What every task provides to the stages (qatflash.tasks.TASKS names the implementations)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from torch import nn
from transformers import PretrainedConfig

from qatflash import slurm
from qatflash.errors import ConfigError, require

if TYPE_CHECKING:
    from qatflash.config import Config, SharedRoot, TimingConfig
    from qatflash.quant.recipe import Recipe


def tester(device: torch.device, limit_batches: int | float | None) -> L.Trainer:
    """A one-device Trainer that tests on `device` (a quantized model's target, ONNX Runtime's CPU),
    whatever device trained the model, over at most `limit_batches` batches (null: all)."""
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=limit_batches,
        plugins=slurm.lightning_plugins(),
    )


class Task(ABC):
    """One kind of job: its data, its model head, its metrics and how its forwards are timed."""

    # Which data configs it reads (data.kind), its headline metric and that metric's direction.
    data_kind: ClassVar[str]
    headline: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    # The statistic of the headline over the test examples, by its name in the report's vocabulary
    # (qatflash.report.quality.STATISTICS): what the report computes its intervals, paired tests
    # and verdicts with, from the examples the lightning module records.
    quality: ClassVar[str]
    # The transformers Auto class that builds the model with this task's head.
    auto_model: ClassVar[Any]
    # Whether each token attends only to those before it (what attention's FLOPs are counted over).
    attends_causally: ClassVar[bool] = False

    def __init__(self, cfg: SharedRoot) -> None:
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, before any work, combinations this task cannot run (another task's data, say)."""
        if cfg.data.kind != cls.data_kind:
            raise ConfigError(
                f"data.kind={cfg.data.kind!r} is data for another task; task={cfg.task.name} reads "
                f"data.kind={cls.data_kind!r}"
            )

    @classmethod
    def check_timing(cls, timing: TimingConfig, recipe: Recipe | None) -> None:
        """Refuse timing this task cannot do: generation (benchmark.new_tokens > 0) is a causal LM's."""
        require(
            timing.new_tokens == 0,
            f"benchmark.new_tokens={timing.new_tokens} times generation, which task={cls.data_kind} does not do; "
            "use benchmark.new_tokens=0 (or task=causal_lm)",
        )

    @property
    def objective(self) -> list[str]:
        """What an optimising sweeper reads when `objective` is not set: the headline figure."""
        return [self.headline]

    def describe(self) -> dict[str, Any]:
        """The task as results.json records it, so that a report needs no knowledge of tasks."""
        return {
            "name": self.cfg.task.name,
            "headline": self.headline,
            "higher_is_better": self.higher_is_better,
            "quality": self.quality,
        }

    @abstractmethod
    def data_module(self) -> L.LightningDataModule:
        """The data module: `index()` counts the training examples, `setup()` tokenizes."""

    @abstractmethod
    def model_config(self, data: L.LightningDataModule) -> PretrainedConfig:
        """The HF config of the model to build, once the data fixed labels and vocabulary."""

    @abstractmethod
    def lightning_module(self, model: nn.Module, data: L.LightningDataModule) -> L.LightningModule:
        """The module that trains, tests and times `model` (FP32, prepared, INT8 or another runtime's)."""

    @abstractmethod
    def example_inputs(self, data: L.LightningDataModule) -> dict[str, torch.Tensor]:
        """Real inputs (a test batch, without targets) an exported or reloaded model is checked on."""

    def baseline_metrics(self, data: L.LightningDataModule) -> dict[str, float]:
        """Figures of a reference model the task computes itself, recorded beside every result."""
        return {}

    def model_facts(self, hf_config: PretrainedConfig, recipe: Recipe | None) -> dict[str, Any]:
        """What the model section of results.json says about this task's kind of model."""
        return {}

    @staticmethod
    @abstractmethod
    def timing_inputs(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
        """The inputs one timed forward takes, of the latency shape asked for (the same every call)."""
