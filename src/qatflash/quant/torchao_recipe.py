"""torchao recipes: `quantize_(model, QATConfig(...))` to fake-quantize, torchao's INT8 tensor subclasses to ship.

torchao is where PyTorch's quantization lives on (torch.ao.quantization is deprecated in torch 2.13).
Its fake quantization is dynamic: activations get per-token scales and weights per-channel (or
per-group) scales computed at every step, so there are no observers to freeze. The activation
scheme (int8, per token, asymmetric) is what the dynamic-activation kernels compute at inference,
so the converted model sees the numbers QAT trained with.
"""

from __future__ import annotations

from typing import Any

import torch
import torchao.quantization as ao
from torch import nn
from torchao.quantization import qat
from torchao.utils import TorchAOBaseTensor

from qatflash.config import QuantConfig
from qatflash.quant.recipe import Recipe
from qatflash.quant.targeting import embedding_targets


class TorchaoRecipe(Recipe):
    """QAT (`qat`) or dynamic PTQ (`ptq_dynamic`) of the targeted Linears, weight-only int8 embeddings."""

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        assert cfg.torchao is not None, "QuantConfig checks that api=torchao has a quant.torchao section"
        self.weight_dtype = getattr(torch, cfg.torchao.weight_dtype)
        group = cfg.torchao.group_size
        self.granularity = ao.PerGroup(group) if group else ao.PerAxis(0)

    def qdq_unavailable(self) -> str | None:
        return "torchao's INT8 (tensor-subclass weights, per-token activation scales) has no ONNX QDQ export"

    def _is_target(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and name in self.targets

    def _fake_quantize_config(self) -> Any:
        return qat.QATConfig(
            activation_config=qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            weight_config=qat.IntxFakeQuantizeConfig(self.weight_dtype, granularity=self.granularity),
            step="prepare",
        )

    def _int8_config(self) -> Any:
        """The inference config matching the fake quantization: int8 per-channel weights get torchao's
        int8 x int8 kernels; narrower or grouped weights its int8-activation, intx-weight kernels."""
        mapping = ao.MappingType.ASYMMETRIC
        if self.weight_dtype == torch.int8 and isinstance(self.granularity, ao.PerAxis):
            return ao.Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping)
        return ao.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=self.weight_dtype, weight_granularity=self.granularity, act_mapping_type=mapping
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        self.select_targets(model)
        if self.cfg.method == "qat":
            ao.quantize_(model, self._fake_quantize_config(), filter_fn=self._is_target)
        return model

    def is_prepared(self, model: nn.Module) -> bool:
        return any(isinstance(m, qat.FakeQuantizerBase) for m in model.modules())

    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        for module in model.modules():
            if isinstance(module, ao.qat.FakeQuantizerBase):
                module.enabled = fake_quant

    def convert(self, model: nn.Module) -> nn.Module:
        model.cpu().eval()
        if self.is_prepared(model):
            ao.quantize_(model, qat.QATConfig(step="convert"))  # back to plain Linear, trained weights
        ao.quantize_(model, self._int8_config(), filter_fn=self._is_target)
        if self.cfg.embeddings == "int8":
            tables = set(embedding_targets(model))
            weight_only = ao.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=ao.PerAxis(0))
            ao.quantize_(model, weight_only, filter_fn=lambda module, name: name in tables)
        return model

    def count_quantized(self, model: nn.Module) -> int:
        return sum(
            isinstance(getattr(m, "weight", None), TorchAOBaseTensor)
            for m in model.modules()
            if isinstance(m, nn.Linear | nn.Embedding)
        )
