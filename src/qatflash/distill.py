"""Quantization-aware distillation (QAD): the QAT student learns its task and its float teacher's outputs.

NVIDIA ModelOpt's way to recover what quantization costs: the loss becomes
α × the task's loss + (1 − α) × T² × KL(teacher ‖ student), both distributions at temperature T
(T² keeps the KL's gradients at the task loss's scale, as Hinton et al. set it). The teacher is the
float model the quantized one should match: the sweep's shared FP32 fine-tune (same task, model,
data, attention, trainer and seed: `qatflash.finetune_cache`) or a model folder, frozen in eval
mode, run without gradients on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qatflash.config import Config, DistillConfig
from qatflash.errors import require
from qatflash.finetune_cache import FinetuneCache

HF_CONFIG = "config.json"


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, scored: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-T softmaxes over the last dimension, the mean over
    positions (those `scored` marks, where given: a language model's labelled tokens)."""
    student_log = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = F.kl_div(student_log, teacher_log, log_target=True, reduction="none").sum(dim=-1)
    return per_position[scored].mean() if scored is not None else per_position.mean()


@dataclass
class Distillation:
    """A frozen teacher and how its outputs weigh in the student's loss."""

    teacher: nn.Module
    alpha: float
    temperature: float

    def __post_init__(self) -> None:
        self.teacher.eval().requires_grad_(False)

    def loss(
        self,
        task_loss: torch.Tensor,
        student: torch.Tensor,
        teacher: torch.Tensor,
        scored: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The distilled loss, and the KL term alone (logged beside it)."""
        kl = distillation_kl(student, teacher, self.temperature, scored)
        return self.alpha * task_loss + (1 - self.alpha) * self.temperature**2 * kl, kl


def teacher_source(cfg: Config, sweep_dir: Path | None) -> Path:
    """Where the teacher's weights are, refused in one line (before any data) where there are none:
    the sweep's shared FP32 fine-tune (its FP32 point must have run first), or the folder given."""
    distill = cfg.quant.distill
    assert distill is not None
    if distill.teacher is not None:
        folder = Path(distill.teacher)
        require(
            (folder / FinetuneCache.WEIGHTS).is_file() or (folder / HF_CONFIG).is_file(),
            f"quant.distill.teacher={distill.teacher} holds neither a shared fine-tune "
            f"({FinetuneCache.WEIGHTS}) nor a Hugging Face model ({HF_CONFIG})",
        )
        return folder
    require(
        sweep_dir is not None and cfg.reuse_fp32,
        "quant.distill.teacher=null takes the sweep's shared FP32 fine-tune, which a single run (or "
        "reuse_fp32=false) has none of; run it in a sweep after quant=fp32, or set quant.distill.teacher "
        "to a model folder",
    )
    cache = FinetuneCache.of(sweep_dir, cfg)
    require(
        cache.complete,
        f"quant.distill.teacher=null takes the sweep's shared FP32 fine-tune, and {cache.path} holds none "
        "yet; list quant=fp32 before this point in the sweep (it runs first), or set quant.distill.teacher "
        "to a model folder",
    )
    return cache.path


def load_teacher(folder: Path, student_like: nn.Module, distill: DistillConfig) -> Distillation:
    """The teacher from `folder` into a copy of the freshly built student (`student_like`: the
    architecture, attention and head the fine-tune had), or a Hugging Face model's own folder."""
    if (folder / FinetuneCache.WEIGHTS).is_file():
        teacher = student_like
        FinetuneCache(folder).load(teacher)
    else:
        implementation = student_like.config._attn_implementation
        teacher = type(student_like).from_pretrained(folder, attn_implementation=implementation)
    return Distillation(teacher, distill.alpha, distill.temperature)
