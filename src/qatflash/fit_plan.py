"""How many optimizer steps a fit will take, known before its first batch.

Schedules measured in optimizer steps (QAT's fake-quant start and observer freeze) must fall inside
the fit, or the job trains to the end and ships a model whose observers never ran. The count
follows Lightning's own arithmetic (`Trainer.estimated_stepping_batches`, which also sizes the
learning-rate schedule): each of the trainer's processes takes its share of the examples, batches
are limited by `limit_train_batches`, an epoch's last incomplete accumulation still steps, and
`max_steps` cuts the epochs short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L


@dataclass(frozen=True)
class FitPlan:
    examples: int
    batch_size: int
    processes: int
    batches_per_epoch: int
    accumulate: int
    epochs: int | None  # None: until max_steps
    max_steps: int | None

    @classmethod
    def of(cls, trainer: L.Trainer, examples: int, batch_size: int) -> FitPlan:
        """The plan of `trainer` fitting `examples` training examples in batches of `batch_size`."""
        processes = trainer.world_size
        # A distributed sampler gives every process ceil(examples / processes), padding with repeats.
        batches = math.ceil(math.ceil(examples / processes) / batch_size)
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        max_steps = trainer.max_steps if trainer.max_steps != -1 else None
        return cls(
            examples, batch_size, processes, batches, trainer.accumulate_grad_batches, epochs, max_steps
        )

    @property
    def steps(self) -> int:
        per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        candidates = [per_epoch * max(self.epochs, 1)] if self.epochs is not None else []
        candidates += [self.max_steps] if self.max_steps is not None else []
        return min(candidates)

    def describe(self) -> str:
        """Where the count comes from, for a refusal that names it."""
        epochs = f"{self.epochs} epoch(s)" if self.epochs is not None else "epochs unlimited"
        cap = f", max_steps {self.max_steps}" if self.max_steps is not None else ""
        return (
            f"{epochs} x {self.batches_per_epoch} batches of {self.batch_size} from {self.examples} training "
            f"examples over {self.processes} process(es), accumulating {self.accumulate}{cap}"
        )
