"""Shipping a trained model as INT8: calibrate (static PTQ), convert, save, reload and compare.

What comes out is one frozen `Shipped`: the FP32 model a job times as its reference, the prepared
model (QAT-trained or calibrated: what a QDQ export is made from), the INT8 model, and what the
record says about them. Nothing here swaps a model inside a LightningModule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatflash.quant.artifact import serialized_bytes
from qatflash.quant.callback import QuantizationAwareTraining
from qatflash.quant.recipe import Recipe
from qatflash.quant.targeting import coverage


@dataclass(frozen=True)
class Shipped:
    """The models a job ships and times. `fp32` is the fine-tuned model, except for QAT, whose FP32
    reference is the model before fine-tuning (`fp32_trained` False): timed and sized, never scored."""

    fp32: nn.Module
    fp32_trained: bool
    recipe: Recipe | None = None
    prepared: nn.Module | None = None
    int8: nn.Module | None = None
    record: dict[str, Any] = field(default_factory=dict)  # results.json's model section
    metrics: dict[str, float] = field(default_factory=dict)


def calibrated(recipe: Recipe, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> nn.Module:
    """A prepared copy of the fine-tuned model, its observers fed `batches` (static PTQ; dynamic PTQ
    observes nothing ahead of conversion)."""
    prepared = recipe.prepare(copy.deepcopy(model).cpu().train())
    if recipe.cfg.method == "ptq_static":
        prepared.eval()
        with torch.inference_mode():
            for batch in batches:
                prepared(**batch)
    return prepared


def ship(
    recipe: Recipe,
    trained: nn.Module,
    qat: QuantizationAwareTraining | None,
    twin: nn.Module | None,
    calibration: Callable[[], Iterable[dict[str, torch.Tensor]]],
) -> Shipped:
    """The INT8 form of `trained`: QAT converts its prepared model (in this process, after a spawned
    fit whose callback converted in a worker), PTQ a calibrated copy of the fine-tuned one."""
    if qat is not None:
        assert twin is not None, "QAT keeps its model's FP32 twin from before the fit"
        int8 = qat.int8_model if qat.int8_model is not None else qat.to_int8(trained)
        return Shipped(twin, False, recipe, trained, int8)
    prepared = calibrated(recipe, trained, calibration())
    return Shipped(trained, True, recipe, prepared, recipe.convert(copy.deepcopy(prepared)))


# Forwards of the INT8 model itself that measure how far its kernels' results move between runs.
RERUNS = 3


def check_reload(int8: nn.Module, reloaded: nn.Module, example: dict[str, torch.Tensor], path: Path) -> float:
    """Prove the reloaded artifact computes what the model it was saved from computes; returns the
    model's own run-to-run spread (largest absolute logit difference between its reruns).

    The reloaded logits must equal the model's exactly when its kernels are deterministic (spread 0,
    as on the AMD CPUs this project first ran on). Some INT8 kernels are not: on a 2-core Intel Xeon
    with AMX, x86 eager INT8 after a DDP fit moved by 1.8e-6 between two identical forwards. There
    the reload may differ by no more than twice that spread; a lost scale or a wrong weight moves
    logits by orders of magnitude more."""
    int8.eval()  # not chained: exported graphs' eval() returns None
    with torch.inference_mode():
        first = int8(**example).logits
        spread = max(float((first - int8(**example).logits).abs().max()) for _ in range(RERUNS))
        gap = float((first - reloaded(**example).logits).abs().max())
    if gap > 2 * spread:
        raise RuntimeError(
            f"the INT8 artifact {path} does not reproduce the model's logits: they differ by {gap:.3g}, "
            f"beyond the model's own run-to-run spread {spread:.3g}"
        )
    return spread


def saved(
    shipped: Shipped, folder: Path, skeleton: Callable[[], nn.Module], example: dict[str, torch.Tensor]
) -> Shipped:
    """`shipped` with its INT8 artifact written to `folder`, proven to reload to identical logits, and sized."""
    recipe, int8 = shipped.recipe, shipped.int8
    assert recipe is not None and int8 is not None, "only quantized jobs save an INT8 artifact"
    quantized = recipe.check_converted(int8)  # before anything is written
    path = folder / recipe.artifact_name
    int8_bytes = recipe.save(int8, path)
    reloaded = recipe.load(path, skeleton)
    spread = check_reload(int8, reloaded, example, path)
    fp32_bytes = serialized_bytes(shipped.fp32)
    record = {
        "int8_artifact": path.name,
        "int8_bytes": int8_bytes,
        "fp32_bytes": fp32_bytes,
        "quantized_modules": quantized,
        "coverage": coverage(shipped.fp32, recipe.cfg.targets, recipe.selected),
        "int8_rerun_spread": spread,
    }
    metrics = {**shipped.metrics, "model/size_ratio": int8_bytes / fp32_bytes}
    return replace(shipped, record={**shipped.record, **record}, metrics=metrics)
