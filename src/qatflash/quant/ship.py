"""Shipping a trained model quantized: calibrate (static PTQ), convert, save, reload and compare.

What comes out is one frozen `Shipped`: the float model a job times as its reference, the
prepared model (QAT-trained or calibrated: what a QDQ export is made from), the quantized model, and what the
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

from qatflash.placement import place
from qatflash.quant.artifact import serialized_bytes
from qatflash.quant.callback import QuantizationAwareTraining
from qatflash.quant.recipe import Recipe
from qatflash.quant.targeting import coverage


@dataclass(frozen=True)
class Shipped:
    """The models a job ships and times. `float_model` is the fine-tuned model, except for QAT,
    whose float reference is the model before fine-tuning (`float_trained` False): timed and sized,
    never scored."""

    float_model: nn.Module
    float_trained: bool
    recipe: Recipe | None = None
    prepared: nn.Module | None = None
    quantized: nn.Module | None = None
    record: dict[str, Any] = field(default_factory=dict)  # results.json's model section
    metrics: dict[str, float] = field(default_factory=dict)


def calibrated(recipe: Recipe, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> nn.Module:
    """A prepared copy of the fine-tuned model on its target's device and in its dtype, its
    observers fed `batches` (static PTQ; dynamic PTQ observes nothing ahead of conversion)."""
    target = recipe.target()
    prepared = recipe.prepare(place(copy.deepcopy(model), target.torch_device).to(target.torch_dtype).train())
    if recipe.cfg.method == "ptq_static":
        prepared.eval()
        with torch.inference_mode():
            for batch in batches:
                prepared(**on_device(batch, target.torch_device))
    return prepared


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def ship(
    recipe: Recipe,
    trained: nn.Module,
    qat: QuantizationAwareTraining | None,
    twin: nn.Module | None,
    calibration: Callable[[], Iterable[dict[str, torch.Tensor]]],
) -> Shipped:
    """The quantized form of `trained`: QAT converts its prepared model (in this process, after a spawned
    fit whose callback converted in a worker), PTQ a calibrated copy of the fine-tuned one."""
    if qat is not None:
        assert twin is not None, "QAT keeps its model's float twin from before the fit"
        quantized = qat.quantized_model if qat.quantized_model is not None else qat.to_quantized(trained)
        return Shipped(twin, False, recipe, trained, quantized)
    prepared = calibrated(recipe, trained, calibration())
    return Shipped(trained, True, recipe, prepared, recipe.converted(copy.deepcopy(prepared)))


# Forwards of the quantized model itself that measure how far its kernels' results move between runs.
RERUNS = 3


def check_reload(
    quantized: nn.Module, reloaded: nn.Module, example: dict[str, torch.Tensor], path: Path
) -> float:
    """Prove the reloaded artifact computes what the model it was saved from computes; returns the
    model's own run-to-run spread (largest absolute logit difference between its reruns).

    The reloaded logits must equal the model's exactly when its kernels are deterministic (spread 0,
    as on the AMD CPUs this project first ran on). Some INT8 kernels are not: on a 2-core Intel Xeon
    with AMX, x86 eager INT8 after a DDP fit moved by 1.8e-6 between two identical forwards. There
    the reload may differ by no more than twice that spread; a lost scale or a wrong weight moves
    logits by orders of magnitude more."""
    quantized.eval()  # not chained: exported graphs' eval() returns None
    with torch.inference_mode():
        first = quantized(**example).logits
        spread = max(float((first - quantized(**example).logits).abs().max()) for _ in range(RERUNS))
        gap = float((first - reloaded(**example).logits).abs().max())
    if gap > 2 * spread:
        raise RuntimeError(
            f"the quantized artifact {path} does not reproduce the model's logits: they differ by {gap:.3g}, "
            f"beyond the model's own run-to-run spread {spread:.3g}"
        )
    return spread


def saved(
    shipped: Shipped, folder: Path, skeleton: Callable[[], nn.Module], example: dict[str, torch.Tensor]
) -> Shipped:
    """`shipped` with its quantized artifact written to `folder`, proven to reload to identical
    logits (on its target's device), and sized."""
    recipe, quantized = shipped.recipe, shipped.quantized
    assert recipe is not None and quantized is not None, "only quantized jobs save an artifact"
    modules = recipe.check_converted(quantized)  # before anything is written
    path = folder / recipe.artifact_name
    quantized_bytes = recipe.save(quantized, path)
    reloaded = recipe.load(path, skeleton)
    spread = check_reload(quantized, reloaded, on_device(example, recipe.target().torch_device), path)
    float_bytes = serialized_bytes(shipped.float_model)
    record = {
        **recipe.product_record(),
        "artifact": path.name,
        "quantized_bytes": quantized_bytes,
        "float_bytes": float_bytes,
        "quantized_modules": modules,
        "coverage": coverage(shipped.float_model, recipe.cfg.targets, recipe.selected),
        "quantized_rerun_spread": spread,
    }
    metrics = {**shipped.metrics, "model/size_ratio": quantized_bytes / float_bytes}
    return replace(shipped, record={**shipped.record, **record}, metrics=metrics)
