"""The QAT schedule as a Lightning callback: prepare, fake-quant start, observer freeze, conversion at fit end.

torch.ao's FakeQuantize updates its observer on every forward in which the observer is enabled,
whatever `module.training` says. Lightning 1.x's QuantizationAwareTraining callback therefore let
validation and sanity-check batches move the scales; here observers are switched on only for
training batches, and only inside [fake_quant_start_step, freeze_observers_step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat

from qatflash.errors import ConfigError
from qatflash.fit_plan import FitPlan
from qatflash.quant.lora import add_adapters, merge_adapters
from qatflash.quant.recipe import Recipe

# Where fake quantization starts when `quant.fake_quant_start_step` is null, by what the job trains.
# A pretrained model's weights already sit where quantization must keep them: fake-quantize from the
# first step. Random weights move far in the first steps; fake-quantized from step 0, a from-scratch
# decoder ended 22.6 % [21.5, 23.8] worse in perplexity than its float twin (issue 31), where float
# for the first 75 % and fake quantization over the last 25 % (the decoder presets') cost 0.01-0.2 %.
PRETRAINED_START = 0
FROM_SCRATCH_START = 0.75


@dataclass(frozen=True)
class StartRule:
    """Where fake quantization starts (a step or a fraction of the fit's steps), and why."""

    start: int | float
    why: str


def fake_quant_start(configured: int | float | None, pretrained: bool, recipe: Recipe) -> StartRule:
    """The configured start, or the default for the job's kind (`PRETRAINED_START`,
    `FROM_SCRATCH_START`); from step 0 where the recipe's fake quantization cannot be switched off."""
    if configured is not None:
        return StartRule(configured, "configured")
    if pretrained:
        return StartRule(PRETRAINED_START, "default: fine-tunes a pretrained model")
    if not recipe.delays_fake_quant():
        return StartRule(
            0,
            f"default: trains from scratch, but quant.api={recipe.cfg.api}'s fake quantization cannot be switched off",
        )
    return StartRule(FROM_SCRATCH_START, "default: trains from scratch (float first)")


class QuantizationAwareTraining(L.Callback):
    def __init__(
        self,
        recipe: Recipe,
        fake_quant_start: StartRule = StartRule(0, "configured"),
        freeze_observers_step: int | float | None = None,
        ships: bool = True,
    ) -> None:
        self.recipe = recipe
        # False where this machine cannot make the quantized model (an FP8 target on a CPU): the fit
        # trains and evaluates with fake quantization and converts nothing.
        self.ships = ships
        # As configured (a step, or a fraction of the fit's steps); `check_schedule` resolves both
        # to optimizer steps once the fit's length is known.
        self.start: int | float = fake_quant_start.start
        self.start_why = fake_quant_start.why
        self.freeze: int | float | None = freeze_observers_step
        self.quantized_model: nn.Module | None = None
        # With LoRA: the parameters that train (adapters and the float head), counted at prepare.
        self.trainable_parameters: int | None = None

    def observing(self, step: int) -> bool:
        return step >= self.start and (self.freeze is None or step < self.freeze)

    def check_schedule(self, plan: FitPlan) -> None:
        """Resolve fractions to steps of this fit, and refuse schedule steps the fit never reaches:
        observers that never ran leave every INT8 activation scale at its initial 1.0, and the job
        would still finish as if it had trained."""
        self.start = _steps(self.start, plan.steps)
        self.freeze = _steps(self.freeze, plan.steps) if self.freeze is not None else None
        if self.freeze is not None and self.freeze <= self.start:
            raise ConfigError(
                f"quant.freeze_observers_step resolves to step {self.freeze}, not after "
                f"quant.fake_quant_start_step's step {self.start} of the fit's {plan.steps}"
            )
        schedule = (
            ("quant.fake_quant_start_step", self.start, "fake quantization and observers would never run"),
            ("quant.freeze_observers_step", self.freeze, "observers would never freeze (null: never freeze)"),
        )
        for name, step, consequence in schedule:
            if step is not None and step >= plan.steps:
                raise ConfigError(
                    f"{name}={step} is not below the fit's {plan.steps} optimizer steps ({plan.describe()}): "
                    f"{consequence}; use a step below {plan.steps} or train longer"
                )

    def schedule(self) -> dict[str, Any]:
        """What results.json's params record of the schedule (steps once `check_schedule` resolved them)."""
        return {
            "fake_quant_start_step": self.start,
            "fake_quant_start_from": self.start_why,
            "freeze_observers_step": self.freeze,
        }

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before optimizers exist, so they see the QAT modules' parameters; idempotent for re-entry.
        # A checkpoint (resume, or trainer.test(ckpt_path=...)) is restored after this hook, into the
        # prepared modules, so fake-quant and observer state come back with the weights.
        if stage == "fit":
            self.prepare(pl_module)

    def prepare(self, pl_module: L.LightningModule) -> None:
        """Swap in the prepared model (fake quantization off until the start step); idempotent."""
        if not self.recipe.is_prepared(pl_module.model):
            pl_module.model = self.recipe.prepare(pl_module.model)
            lora = self.recipe.cfg.lora
            if lora is not None:
                linears = [self.recipe.prepared_linear(name) for name in self.recipe.targets]
                self.trainable_parameters = add_adapters(pl_module.model, linears, lora)
            self.recipe.set_phase(pl_module.model, fake_quant=False, observe=False)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self.recipe.set_phase(pl_module.model, fake_quant=step >= self.start, observe=self.observing(step))
        if step == self.start:
            self.recipe.initialize_ranges(pl_module.model)
        if self.freeze is not None and step >= self.freeze:
            # Batch-norm statistics (conv-bn QAT modules; transformers have none) freeze with the observers.
            pl_module.model.apply(nniqat.freeze_bn_stats)

    def _evaluating(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fake quantization needs scales, which exist only once a training step has observed data:
        # a sanity check at step 0 runs in float (Lightning 1.x's callback crashed there on per-channel weights).
        self.recipe.set_phase(pl_module.model, fake_quant=trainer.global_step > self.start, observe=False)

    on_validation_start = on_test_start = on_predict_start = on_sanity_check_start = _evaluating

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.merge(pl_module.model)
        # Rank 0 alone ships (the other ranks of a DDP fit stop after it): converting on every rank
        # would put a copy per rank on the target's device, the first GPU for a CUDA target.
        if self.ships and trainer.is_global_zero:
            self.to_quantized(pl_module.model)

    def merge(self, model: nn.Module) -> None:
        """LoRA's adapters merged into the fake-quantized base in place, its weight ranges set
        again for the merged weights; nothing once merged, or without LoRA."""
        if merge_adapters(model):
            self.recipe.reobserve_weights(model)

    def to_quantized(self, model: nn.Module) -> nn.Module:
        """Convert a copy (adapters merged first); the fake-quant model stays in place for its own
        evaluation.

        Called at fit end, or by the caller after a spawned (DDP) fit, whose callbacks ran in the
        worker processes and handed back only the trained weights.
        """
        self.merge(model)
        self.recipe.set_phase(model, fake_quant=True, observe=False)
        self.quantized_model = self.recipe.converted(copy.deepcopy(model))
        return self.quantized_model


def _steps(point: int | float, steps: int) -> int:
    """A schedule point in optimizer steps: a float is that fraction of the fit's `steps`."""
    return int(point * steps) if isinstance(point, float) else point
