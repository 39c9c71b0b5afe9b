"""Quantization-aware distillation: the loss as computed by hand, a teacher that never trains, and a
sweep's QAT point distilled from the FP32 point's shared fine-tune."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, LM_FAST

from qatflash.config import to_config
from qatflash.distill import Distillation, distillation_kl
from qatflash.errors import ConfigError
from qatflash.job import JobContext
from qatflash.models import build_model
from qatflash.pipeline import run
from qatflash.tasks import TASKS

CHOICES = {"model": "tiny_bert", "data": "synthetic", "quant": "qad_x86", "attention": "sdpa"}


def _softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in logits]
    return [e / sum(exps) for e in exps]


def _kl(teacher: list[float], student: list[float], temperature: float) -> float:
    """KL(teacher || student) of their temperature softmaxes, in plain floats."""
    p, q = _softmax(teacher, temperature), _softmax(student, temperature)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def test_the_distilled_loss_is_the_hand_computed_one() -> None:
    """alpha x task + (1 - alpha) x T^2 x KL(teacher || student): the direction, the weights and the
    T^2 each change the number (the two distributions are not mirror images)."""
    student, teacher = [[1.0, 0.0, -1.0], [0.5, 0.5, 3.0]], [[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]]
    temperature, alpha, task = 3.0, 0.25, torch.tensor(0.7)
    kls = [_kl(t, s, temperature) for t, s in zip(teacher, student, strict=True)]
    distillation = Distillation(torch.nn.Identity(), alpha, temperature)
    loss, kl = distillation.loss(task, torch.tensor(student), torch.tensor(teacher), scored=None)
    assert kl.item() == pytest.approx(sum(kls) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.25 * 0.7 + 0.75 * 9 * sum(kls) / 2, rel=1e-6)
    # a language model's positions that predict no scored token do not count
    scored = torch.tensor([[True, False]])
    only_first = distillation_kl(torch.tensor([student]), torch.tensor([teacher]), temperature, scored)
    assert only_first.item() == pytest.approx(kls[0], rel=1e-6)
    both = distillation_kl(torch.tensor([student]), torch.tensor([teacher]), temperature, ~scored | scored)
    assert both.item() == pytest.approx(sum(kls) / 2, rel=1e-6)  # a mean over positions, not a sum


def _trained(
    make_cfg, overrides: list[str], alpha: float, steps: int
) -> tuple[L.LightningModule, L.Trainer, dict]:
    """The task's module around a model built from its config, distilled from an exact copy of it
    (the copy's weights as they were before training are returned too), trained `steps` steps."""
    config = to_config(make_cfg(*overrides))
    task = TASKS.load(config.task.name)(config)
    data = task.data_module()
    data.setup()
    student = build_model(config.model, config.attention, task.model_config(data), task.auto_model)
    teacher = copy.deepcopy(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = task.lightning_module(student, data)
    module.distillation = Distillation(teacher, alpha=alpha, temperature=2.0)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer, before


def test_the_teacher_stays_frozen_and_outside_what_trains_and_ships(make_cfg) -> None:
    module, trainer, before = _trained(make_cfg, [*FAST, "data.batch_size=16"], alpha=0.5, steps=4)
    teacher, student = module.distillation.teacher, module.model
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(before["classifier.weight"], student.classifier.weight)
    assert not any(key.startswith("distillation") for key in module.state_dict())
    assert trainer.callback_metrics["train/distill_kl"] > 0  # dropout: the student differs from its copy
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_language_models_teacher_is_read_at_the_positions_that_predict(make_cfg, text_corpus: Path) -> None:
    """Llama has no dropout: a teacher identical to the student gives a KL of exactly 0 at the first
    step, unless its logits are read one position off."""
    overrides = [*LM_FAST, f"data.path={text_corpus}", "model=llama_tiny", "model.arch.num_hidden_layers=1"]
    _, trainer, _ = _trained(make_cfg, overrides, alpha=0.0, steps=1)
    assert trainer.callback_metrics["train/distill_kl"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.e2e  # two trainings, about 15 s: `make test-e2e` (CI runs it)
def test_a_sweeps_qat_point_distils_from_its_fp32_points_fine_tune(
    make_cfg, learned_model, tmp_path: Path
) -> None:
    def point(name: str, *overrides: str, sweep: Path | None = tmp_path) -> dict:
        config = to_config(make_cfg(*learned_model.overrides, "logger=none", "benchmark=none", *overrides))
        return run(config, JobContext(folder=tmp_path / name, choices=CHOICES, sweep_dir=sweep))

    with pytest.raises(ConfigError, match=r"and .*\.fp32_models/\w+ holds none yet; list quant=fp32 before"):
        point("too_early", "quant=qad_x86")
    with pytest.raises(ConfigError, match=r"which a single run .* has none of"):
        point("single", "quant=qad_x86", sweep=None)
    with pytest.raises(ConfigError, match=r"quant.distill needs quant.method=qat .*, not ptq_static"):
        point("ptq", "quant=qad_x86", "quant.method=ptq_static")
    fp32 = point("fp32")
    distilled = point("qad", "quant=qad_x86")
    teacher = distilled["params"]["distill"]
    assert Path(teacher["teacher"]).parent == tmp_path / ".fp32_models"
    assert (teacher["alpha"], teacher["temperature"]) == (0.5, 2.0)
    assert distilled["metrics"]["test/acc_quantized"] >= fp32["metrics"]["test/acc"] - 8 / 256
