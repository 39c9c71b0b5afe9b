"""Learned quantization ranges (LSQ, `quant.range_lr`) through both APIs that have them: they start
where observers (torch.ao eager) or the weights (torchao) put them, train at their own rate, and are
the ranges the converted model ships."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from conftest import FAST
from test_quant import _data, _quiet_trainer, _tiny_bert
from torch.ao.nn import quantized as nnq
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torchao.quantization.qat import IntxFakeQuantizer

from qatflash.config import ObserverConfig, to_config
from qatflash.errors import ConfigError
from qatflash.module import LearnedRanges, SequenceClassifier
from qatflash.quant import make_recipe
from qatflash.quant.callback import QuantizationAwareTraining, StartRule
from qatflash.quant.eager import _learnable
from qatflash.quant.qdq import QuantDequant

STEPS, START, FREEZE = 10, 2, 5
# tiny_bert's all_linears: 2 blocks x 6 + the pooler; the classifier is left out.
TARGETS = 13


def _scales(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every learnable scale (torch.ao's and torchao's quantizers), as it is now."""
    return [
        m.scale.detach().clone()
        for m in model.modules()
        if isinstance(m, _LearnableFakeQuantize)
        or (isinstance(m, IntxFakeQuantizer) and m.config.range_learning)
    ]


def _fit(make_cfg, recipe_name: str, freeze: int | None) -> dict[str, Any]:
    """tiny_bert QAT for STEPS steps, fake quantization from START (and the eager observers frozen
    at `freeze`); the scales before every step, the optimizer's groups, and the converted model."""
    freeze_step = "null" if freeze is None else freeze
    config = to_config(
        make_cfg(
            *FAST, f"quant={recipe_name}", "data.batch_size=16", f"quant.freeze_observers_step={freeze_step}"
        )
    )
    data = _data(config)
    module = SequenceClassifier(_tiny_bert(len(data.tokenizer)), config.model.optim, 2)
    recipe = make_recipe(config.quant)
    module.learned_ranges = LearnedRanges(config.quant.range_lr, recipe.range_parameters)
    callback = QuantizationAwareTraining(recipe, StartRule(START, "configured"), freeze)
    seen: dict[str, Any] = {"scales": {}, "weights": {}}

    class Watch(L.Callback):  # after the QAT callback: sees each step's phase and initialisation
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen["scales"][trainer.global_step] = _scales(pl_module.model)
            seen["weights"][trainer.global_step] = {
                n: p.detach().clone() for n, p in pl_module.model.named_parameters() if n.endswith(".weight")
            }

        def on_train_end(self, trainer, pl_module) -> None:
            seen["scales"]["end"] = _scales(pl_module.model)
            seen["groups"] = trainer.optimizers[0].param_groups

    trainer = _quiet_trainer(
        max_steps=STEPS, limit_val_batches=0, enable_checkpointing=False, callbacks=[callback, Watch()]
    )
    trainer.fit(module, datamodule=data)
    return {
        **seen,
        "recipe": recipe,
        "model": module.model,
        "converted": callback.quantized_model,
        "lr": config.quant.range_lr,
    }


def _changed(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    return sum(not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _check_optimizer(fit: dict[str, Any], count: int) -> None:
    """The ranges train in a group of their own, at quant.range_lr, without weight decay, and nowhere else."""
    *model_groups, ranges = fit["groups"]
    learned = fit["recipe"].range_parameters(fit["model"])
    assert len(learned) == count
    assert [id(p) for p in ranges["params"]] == [id(p) for p in learned]
    assert ranges["weight_decay"] == 0.0 and ranges["initial_lr"] == fit["lr"]
    elsewhere = {id(p) for group in model_groups for p in group["params"]}
    assert not elsewhere & {id(p) for p in learned}


def test_eager_ranges_come_from_the_observers_then_train_and_ship(make_cfg) -> None:
    fit = _fit(make_cfg, "qat_x86_lsq", FREEZE)
    scales, model = fit["scales"], fit["model"]
    quantizers = [m for m in model.modules() if isinstance(m, _LearnableFakeQuantize)]
    # A weight and an output (activation) quantizer per Linear, and each wrapper's input quantizer.
    assert len(quantizers) == 3 * TARGETS
    # x86's activations keep reduce_range's half grid (no int16 overflow without VNNI), weights the full one.
    grids = {(q.qscheme, q.quant_min, q.quant_max) for q in quantizers}
    assert grids == {(torch.per_tensor_affine, 0, 127), (torch.per_channel_symmetric, -128, 127)}
    _check_optimizer(fit, 2 * len(quantizers))
    per_channel = [q for q in quantizers if q.qscheme == torch.per_channel_symmetric]
    assert sorted(q.scale.numel() for q in per_channel) == sorted(
        m.out_features
        for m in model.modules()
        if type(m).__name__ == "Linear" and hasattr(m, "weight_fake_quant")
    )
    assert _changed(scales[0], scales[START]) == 0, "nothing observed before fake quantization starts"
    assert _changed(scales[START], scales[FREEZE]) == len(quantizers), "the observers set every range"
    for quantizer in quantizers:  # where learning took over, the observer's estimate froze
        assert quantizer.static_enabled.item() == 0 and quantizer.learning_enabled.item() == 1
    assert _changed(scales[FREEZE], scales["end"]) == len(quantizers), "every range learned"
    converted = fit["converted"]
    linears = [m for m in converted.modules() if isinstance(m, nnq.Linear)]
    assert len(linears) == TARGETS
    shipped_weights = sorted(tuple(m.weight().q_per_channel_scales().float().tolist()) for m in linears)
    learned_weights = sorted(tuple(q.scale.detach().tolist()) for q in per_channel)
    assert shipped_weights == learned_weights, "the converted weights carry the learned scales exactly"
    shipped_outputs = sorted(m.scale for m in linears)
    learned_outputs = sorted(
        float(m.activation_post_process.scale)
        for m in model.modules()
        if hasattr(m, "weight_fake_quant") and isinstance(m.activation_post_process, _LearnableFakeQuantize)
    )
    assert shipped_outputs == learned_outputs


def test_torchao_ranges_start_from_the_weights_where_fake_quantization_starts_train_and_ship(
    make_cfg,
) -> None:
    fit = _fit(make_cfg, "qat_torchao_8da4w_lsq", None)
    scales, model = fit["scales"], fit["model"]
    quantizers = [m.weight_fake_quantizer for m in model.modules() if hasattr(m, "weight_fake_quantizer")]
    assert len(quantizers) == TARGETS and all(q.config.range_learning for q in quantizers)
    _check_optimizer(fit, TARGETS)  # symmetric int4: scales learn, zero points stay 0
    # Initialised afresh at the start step, from the weights as they are then (float training moved them):
    # torchao's symmetric int4 scale is each group of 32's largest magnitude over 7.5.
    weights = fit["weights"][START]
    names = [n.removesuffix(".weight_fake_quantizer") for n, m in model.named_modules() if m in quantizers]
    for name, scale in zip(names, scales[START], strict=True):
        weight = weights[f"{name}.weight"]
        expected = weight.view(weight.shape[0], -1, 32).abs().amax(-1) / 7.5
        torch.testing.assert_close(scale.flatten(), expected.flatten(), rtol=1e-6, atol=0)
    assert _changed(scales[0], scales[START]) == TARGETS, "initialised where fake quantization starts"
    assert _changed(scales[START], scales["end"]) == TARGETS, "every range learned"
    late = fit["weights"][STEPS - 1]  # learned, not recomputed from the weights at every step
    for name, scale in zip(names, scales[STEPS - 1], strict=True):
        weight = late[f"{name}.weight"]
        rule = weight.view(weight.shape[0], -1, 32).abs().amax(-1) / 7.5
        assert not torch.allclose(scale.flatten(), rule.flatten(), rtol=1e-6, atol=0), name
    shipped = {n: m.weight for n, m in fit["converted"].named_modules() if n in names}
    for name, quantizer in zip(names, quantizers, strict=True):
        assert torch.equal(shipped[name].scale.flatten().float(), quantizer.scale.detach().flatten())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["quant=ptq_static", "quant.range_lr=1e-5"],
            r"quant.range_lr needs quant.method=qat .*, not ptq_static",
        ),
        (["quant=qat_x86", "quant.range_lr=0"], r"quant.range_lr=0.0 must be > 0 or null"),
        (
            ["quant=qat_x86", "quant.range_lr=1e-5"],
            r"quant.range_lr=1e-05: .*freeze_observers_step, which is null",
        ),
        (
            ["quant=qat_pt2e_x86", "quant.range_lr=1e-5"],
            r"quant.range_lr=1e-05: quant.api=pt2e has no learnable",
        ),
        (
            ["quant=qat_mxfp8", "quant.range_lr=1e-5"],
            r"learns ranges of a quant.torchao.weight .*spell one out",
        ),
        # torchao would drop the learned scales at conversion: the convert config has no custom_scale
        (
            ["quant=qat_torchao_int8", "quant.range_lr=1e-5"],
            r"Int8DynamicActivationInt8WeightConfig takes no learned scales",
        ),
    ],
)
def test_learned_ranges_are_refused_where_they_cannot_apply(
    make_cfg, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        to_config(make_cfg(*overrides))


def test_a_learned_fractional_zero_point_exports_as_fake_quantization_rounds_it() -> None:
    """An affine zero point learns as a float; ONNX's QDQ form (`quant.qdq`) takes the integer the
    fake quantization (and conversion) rounds it to, not the truncated one."""
    quantizer = _learnable(ObserverConfig())()  # uint8, per tensor, affine
    quantizer.toggle_observer_update(False)
    quantizer.scale.data.fill_(0.05)
    quantizer.zero_point.data.fill_(68.7)
    x = torch.linspace(-4, 8, 241)
    torch.testing.assert_close(QuantDequant(quantizer)(x), quantizer(x), rtol=0, atol=1e-6)
