"""The LightningModules: one per task, each wrapping any Hugging Face model of the task's head,
whatever its attention or quantization.

Variants (FP32, QAT-prepared, SDPA or flash attention) are configuration applied to the wrapped
model, never subclasses of a module. Batches are dicts and reach the model as keyword arguments,
the way every Hugging Face model expects them. What every task's module shares (the optimizer,
loading after a spawned fit) is `TrainableModule`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import get_linear_schedule_with_warmup

from qatflash.attention import forced_kernel
from qatflash.config import OptimConfig
from qatflash.distill import Distillation
from qatflash.timing.memory import peak_since, reset_peak

# Parameters that AdamW should not decay (standard BERT practice).
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass(frozen=True)
class LearnedRanges:
    """Quantization ranges (scales, zero points) that train with the weights, at their own rate:
    a scale is a thousandth of its weights, which the model's rate would move past zero."""

    lr: float
    # The prepared model's range parameters (`Recipe.range_parameters`).
    of: Callable[[nn.Module], list[nn.Parameter]]


class TrainableModule(L.LightningModule):
    """A wrapped HF model, trained with AdamW and a linear warm-up schedule, any SDPA kernel forced."""

    def __init__(self, model: nn.Module, optim: OptimConfig, sdpa_backend: str | None = None) -> None:
        super().__init__()
        # from_pretrained returns a model in eval mode; fine-tuning wants dropout on, as HF's Trainer does.
        self.model = model.train()
        self.optim = optim
        self.sdpa_backend = sdpa_backend
        # Training throughput, over the training steps only (forward, backward, optimizer), and
        # the fit's peak memory above what it started with (None: this process trained nothing).
        self.trained_tokens, self.train_seconds = 0, 0.0
        self.train_memory: dict[str, int | str] | None = None
        # A frozen float teacher whose outputs the model also learns (QAD); not a submodule, so
        # neither the optimizer, the checkpoints nor the shipped model hold it.
        self.distillation: Distillation | None = None
        self.learned_ranges: LearnedRanges | None = None

    def on_fit_start(self) -> None:
        if self.distillation is not None:
            self.distillation.teacher.to(self.device)

    def _teacher_logits(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the student's inputs, without gradients, under the forced kernel."""
        assert self.distillation is not None
        with torch.no_grad(), forced_kernel(self.sdpa_backend):
            return self.distillation.teacher(**inputs).logits

    def _training_loss(
        self,
        task_loss: torch.Tensor,
        logits: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        scored: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The task's loss, or with a teacher the distilled one (`qatflash.distill`), logged."""
        size = inputs["input_ids"].shape[0]
        if self.distillation is None:
            self.log("train/loss", task_loss, prog_bar=True, batch_size=size)
            return task_loss
        teacher = self._teacher_logits(**inputs)
        if scored is not None:  # a language model's: the positions whose next token is scored
            teacher = teacher[:, :-1]
        loss, kl = self.distillation.loss(task_loss, logits, teacher, scored)
        self.log_dict({"train/task_loss": task_loss, "train/distill_kl": kl}, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def on_train_start(self) -> None:
        self._memory_before = reset_peak(self.device)

    def on_train_end(self) -> None:
        self.train_memory = peak_since(self._memory_before, self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Count the step's tokens (padding included: what the kernels processed) and log the rate."""
        seconds = time.perf_counter() - self._step_started
        tokens = batch["input_ids"].numel()
        self.trained_tokens += tokens
        self.train_seconds += seconds
        self.log("train/tokens_per_s", tokens / seconds, batch_size=batch["input_ids"].shape[0])

    @property
    def train_tokens_per_s(self) -> float | None:
        """Tokens per second of training steps in this process (None: it trained none)."""
        return self.trained_tokens / self.train_seconds if self.train_seconds else None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load into private copies of tensors that a spawned (DDP) fit moved to shared memory.

        Sending the module to spawned workers shares its storages in place, and a shared storage
        cannot be resized, which per-channel scales and observers do on load (torch crashed on it
        when a spawned fit handed its weights back).
        """
        if any(t.is_shared() for t in self.model.buffers()):
            self.model = copy.deepcopy(self.model)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_test_epoch_start(self) -> None:
        self._examples: list[dict[str, torch.Tensor]] = []

    @property
    def test_examples(self) -> dict[str, np.ndarray]:
        """The last test's per-example columns (the task's), in the test split's order (`index`)."""
        columns = {k: torch.cat([b[k] for b in self._examples]).cpu().numpy() for k in self._examples[0]}
        return {"index": np.arange(len(next(iter(columns.values())))), **columns}

    def configure_optimizers(self) -> dict[str, Any]:
        # Learned ranges in a group of their own (whether they learn yet or not: they switch on later).
        ranges = self.learned_ranges.of(self.model) if self.learned_ranges is not None else []
        apart = {id(p) for p in ranges}
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in apart]
        groups = [
            {
                "params": [p for n, p in named if not n.endswith(_NO_DECAY)],
                "weight_decay": self.optim.weight_decay,
            },
            {"params": [p for n, p in named if n.endswith(_NO_DECAY)], "weight_decay": 0.0},
        ]
        if self.learned_ranges is not None:
            groups.append({"params": ranges, "lr": self.learned_ranges.lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.optim.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SequenceClassifier(TrainableModule):
    def __init__(
        self, model: nn.Module, optim: OptimConfig, num_labels: int, sdpa_backend: str | None = None
    ) -> None:
        super().__init__(model, optim, sdpa_backend)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
                "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits; the loss is computed here, not by the model, so that exported graphs hold no loss."""
        with forced_kernel(self.sdpa_backend):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return logits, F.cross_entropy(logits.float(), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, loss = self._loss(batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return self._training_loss(loss, logits, inputs)

    def _evaluate(
        self, batch: dict[str, torch.Tensor], stage: str, metrics: MetricCollection
    ) -> torch.Tensor:
        logits, loss = self._loss(batch)
        metrics.update(logits.argmax(dim=-1), batch["labels"])
        size = batch["labels"].shape[0]
        self.log(f"{stage}/loss", loss, batch_size=size)
        self.log_dict(metrics, batch_size=size)
        return logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Per example: the target and predicted label, the predicted label's probability, the
        example's loss and its token count."""
        logits = self._evaluate(batch, "test", self.test_metrics).float()
        probabilities = logits.softmax(dim=-1)
        self._examples.append(
            {
                "target": batch["labels"],
                "prediction": logits.argmax(dim=-1),
                "score": probabilities.max(dim=-1).values,
                "loss": F.cross_entropy(logits, batch["labels"], reduction="none"),
                "tokens": batch["attention_mask"].sum(dim=-1),
            }
        )
