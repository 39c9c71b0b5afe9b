"""Each module group of a float model quantized alone, in each precision, scored on the validation split.

For every (precision, group) the float model is copied, only the group's modules are quantized by
the precision's own recipe (calibrated, for static PTQ, on the training batches the job's PTQ
would use), and the quantized model is tested on the first `sensitivity.examples` examples of the
validation split — never the test split, which judges the chosen mixes afterwards. Beside the
paired change of the task's statistic to the float model on the same examples (with its bootstrap
interval), a cheap proxy: the mean KL divergence of the float model's output distribution to the
quantized one's over every output position, and the group's serialized bytes in float and
quantized. A row is written as soon as it is measured, so a killed job resumes at the group it
reached.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import nn

from qatflash.config import QuantConfig, SensitivityConfig, TargetsConfig
from qatflash.errors import require
from qatflash.quant import make_recipe
from qatflash.quant.artifact import serialized_bytes
from qatflash.quant.ship import calibrated
from qatflash.report.quality import STATISTICS, Statistic
from qatflash.results import SENSITIVITY_FILE, atomic_path
from qatflash.sensitivity.groups import Group, module_groups
from qatflash.tasks.task import Task, tester

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Scored:
    """A model's per-example results on the calibration examples, and its logits per batch."""

    examples: pd.DataFrame
    logits: list[torch.Tensor]


@dataclass(frozen=True)
class Subject:
    """The float model a sensitivity analysis quantizes: its task, data, device, and where the
    calibration batches of a static precision come from (`count` training batches)."""

    task: Task
    data: LightningDataModule
    model: nn.Module
    device: torch.device
    calibration: Callable[[int], list[Batch]]


@dataclass(frozen=True)
class Setting:
    """What every group's measurement shares: the task and its statistic, the data, the float model
    and its scores, the calibration batches, and how many validation batches are scored."""

    task: Task
    statistic: Statistic
    data: LightningDataModule
    model: nn.Module
    device: torch.device
    batches: int
    reference: Scored
    calibration: list[Batch]


def score(
    task: Task, model: nn.Module, data: LightningDataModule, device: torch.device, batches: int
) -> Scored:
    """`model` tested (its task's test step, its per-example columns) on the first `batches` batches
    of the validation split, with the logits of each."""
    module = task.lightning_module(model, data)
    logits: list[torch.Tensor] = []
    hook = module.model.register_forward_hook(
        lambda _m, _i, out: logits.append(out.logits.detach().float().cpu())
    )
    try:
        tester(device, batches).test(module, dataloaders=data.val_dataloader(), verbose=False)
    finally:
        hook.remove()
    return Scored(pd.DataFrame(module.test_examples), logits)


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """KL(reference ‖ other) of the output distributions, averaged over every output position."""
    total, positions = 0.0, 0
    for p, q in zip(reference, other, strict=True):
        kl = F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        total += float(kl.sum())
        positions += kl.numel()
    return total / positions


def candidates(precisions: dict[str, QuantConfig], model: nn.Module) -> tuple[list[str], list[str]]:
    """The Linear modules and embedding tables the precisions quantize in `model` (left as it is: a
    model on the meta device will do), refused in one line unless a mix of them can be shipped:
    every precision selects the same modules (a mix chooses between them per group), runs on this
    machine, and composes with the others into one recipe (`quant.api=mixed`); and an LM head tied
    to the embedding table is not a group (quantizing it alone unties the two, which no per-group
    size prices). Preflight asks it of the declared model, before any data is loaded."""
    selected = {}
    for name, precision in precisions.items():
        recipe = make_recipe(precision)
        recipe.select_targets(copy.deepcopy(model))
        reason = recipe.unshippable()
        require(reason is None, f"sensitivity.precisions.{name} cannot run here: {reason}")
        selected[name] = (recipe.targets, recipe.tables)
    first, *others = selected.items()
    for name, chosen in others:
        require(
            chosen == first[1],
            f"sensitivity.precisions.{name} selects other modules than sensitivity.precisions.{first[0]} "
            f"({len(chosen[0])} Linears and tables {chosen[1]} against {len(first[1][0])} and {first[1][1]}); "
            "give them the same quant.targets and quant.embeddings",
        )
    if others:  # what a mix of both is: refused now, not when its YAML is loaded
        QuantConfig(api="mixed", method=next(iter(precisions.values())).method, parts=dict(precisions))
    head = tied_head(model)
    require(
        head is None or head not in first[1][0],
        f"sensitivity of {head}, an LM head tied to the embedding table: quantizing it alone unties "
        f"the two; leave it out (quant.targets.exclude=[{head}]) in sensitivity.precisions",
    )
    return first[1]


def tied_head(model: nn.Module) -> str | None:
    """The name of the model's LM head when it shares its weight with the input embedding table."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or table is None or head.weight is not table.weight:
        return None
    return next(name for name, module in model.named_modules() if module is head)


def group_recipe(precision: QuantConfig, group: Group) -> QuantConfig:
    """The precision's recipe quantizing `group` alone (its Linears by name, its table if it holds one)."""
    return replace(
        precision,
        targets=TargetsConfig(include=list(group.linears)),
        embeddings="int8" if group.table else "float",
    )


def measure_group(setting: Setting, precision: QuantConfig, group: Group) -> dict[str, Any]:
    """One row: `group` quantized alone in `precision`, against the float model."""
    started = time.perf_counter()
    recipe = make_recipe(group_recipe(precision, group))
    quantized = recipe.converted(calibrated(recipe, setting.model, setting.calibration))
    recipe.check_converted(quantized)
    scored = score(setting.task, quantized, setting.data, recipe.target().torch_device, setting.batches)
    harm = setting.statistic.harm(setting.statistic.delta(scored.examples, setting.reference.examples))
    return {
        "group": group.name,
        "modules": len(group.modules),
        "harm": harm.estimate,
        "harm_low": harm.low,
        "harm_high": harm.high,
        "kl": mean_kl(setting.reference.logits, scored.logits),
        "float_bytes": sum(serialized_bytes(setting.model.get_submodule(m)) for m in group.modules),
        "bytes": sum(serialized_bytes(quantized.get_submodule(m)) for m in group.modules),
        "examples": len(scored.examples),
        "seconds": round(time.perf_counter() - started, 3),
    }


def measure(
    cfg: SensitivityConfig, subject: Subject, folder: Path, resume: bool
) -> tuple[list[Group], pd.DataFrame]:
    """The groups, and the sensitivity table: one row per (precision, group), written to
    SENSITIVITY_FILE in `folder` row by row; with `resume`, the rows an earlier attempt of this job
    wrote there are kept and their groups not measured again."""
    task, data, device = subject.task, subject.data, subject.device
    model = copy.deepcopy(subject.model).eval()
    linears, tables = candidates(cfg.precisions, model)
    groups = module_groups(linears, tables, cfg.groups)
    batch_size = data.val_dataloader().batch_size or 1
    batches = math.ceil(cfg.examples / batch_size)
    statistic = STATISTICS[task.quality]
    reference = score(task, model, data, device, batches)
    path = folder / SENSITIVITY_FILE
    rows = pd.read_csv(path).to_dict("records") if resume and path.is_file() else []
    done = {(row["precision"], row["group"]) for row in rows}
    if done:
        log.info(
            "sensitivity: %d of %d rows measured by an earlier attempt",
            len(done),
            len(groups) * len(cfg.precisions),
        )
    for name, precision in cfg.precisions.items():
        static = precision.method == "ptq_static"
        batches_in = subject.calibration(precision.calibration_batches) if static else []
        setting = Setting(task, statistic, data, model, device, batches, reference, batches_in)
        for group in groups:
            if (name, group.name) in done:
                continue
            rows.append({"precision": name, **measure_group(setting, precision, group)})
            with atomic_path(path) as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False)
            log.info("sensitivity %s %s: %+.3f %s", name, group.name, rows[-1]["harm"], statistic.unit)
    return groups, pd.DataFrame(rows)
