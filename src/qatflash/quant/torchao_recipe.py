"""torchao recipes: `quantize_(model, QATConfig(...))` to fake-quantize, torchao's INT8 tensor subclasses to ship.

torchao is where PyTorch's quantization lives on (torch.ao.quantization is deprecated in torch 2.13).
A recipe names torchao's own config classes in YAML (`quant.torchao.activation`, `weight`,
`convert`: `_target_` plus keyword arguments), so a new torchao scheme is one YAML file; the
arguments are checked against the class's signature when the config is read, before any data is
loaded, and dtype, granularity and mapping names go through `resolve`. Its fake quantization is
dynamic: scales are computed at every step, so there are no observers to freeze. The activation
scheme of the shipped recipes (int8, per token, asymmetric) is what the dynamic-activation
kernels compute at inference, so the converted model sees the numbers QAT trained with.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
import torchao.quantization as ao
from torch import nn
from torchao.quantization import qat
from torchao.utils import TorchAOBaseTensor

from qatflash.config import QuantConfig
from qatflash.errors import ConfigError, require
from qatflash.quant.recipe import Recipe

_GRANULARITIES = {"per_token": ao.PerToken, "per_tensor": ao.PerTensor, "per_channel": lambda: ao.PerAxis(0)}


def resolve(key: str, value: Any) -> Any:
    """A YAML value as torchao takes it, by what its keyword (the end of `key`) names: `*dtype`/`*precision` a torch
    dtype name (int4, int8, float32, ...), `*granularity` one of per_token, per_tensor, per_channel
    or per_group:<n> (per_group:None is per channel, so that `${..group_size}` may be null), and
    `*mapping_type` a MappingType name (asymmetric, symmetric); anything else as it is."""
    if not isinstance(value, str):
        return value
    if key.endswith(("dtype", "precision")):
        dtype = getattr(torch, value, None)
        require(isinstance(dtype, torch.dtype), f"{key}={value!r} is not a torch dtype")
        return dtype
    if key.endswith("granularity"):
        kind, _, group = value.partition(":")
        if kind == "per_group":
            return ao.PerAxis(0) if group in ("None", "null", "") else ao.PerGroup(int(group))
        require(kind in _GRANULARITIES, f"{key}={value!r}: use one of {[*_GRANULARITIES, 'per_group:<n>']}")
        return _GRANULARITIES[kind]()
    if key.endswith("mapping_type"):
        require(
            value.upper() in ao.MappingType.__members__,
            f"{key}={value!r}: use one of {list(ao.MappingType.__members__)}",
        )
        return ao.MappingType[value.upper()]
    return value


def build(name: str, spec: dict[str, Any]) -> Any:
    """The torchao config object `spec` describes (`_target_` + keyword arguments), checked against
    the class's signature; `name` is its config key, for refusals."""
    target = spec.get("_target_")
    require(isinstance(target, str), f"{name} needs a _target_ (a torchao config class), got {spec!r}")
    module, _, attribute = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{name}._target_={target} is not an importable class") from None
    parameters = inspect.signature(cls).parameters
    kwargs = {k: resolve(f"{name}.{k}", v) for k, v in spec.items() if k != "_target_"}
    unknown = sorted(set(kwargs) - set(parameters))
    require(not unknown, f"{name}: {attribute} takes no {unknown}; it takes {sorted(parameters)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{name}: {attribute}({kwargs}) is refused by torchao: {error}") from None


class TorchaoRecipe(Recipe):
    """QAT (`qat`), dynamic PTQ (`ptq_dynamic`) or weight-only PTQ (`ptq_weight_only`) of the targeted
    Linears, with weight-only int8 embeddings."""

    methods = ("ptq_dynamic", "ptq_weight_only", "qat")

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        super().check_config(cfg)
        section = cfg.torchao
        require(
            section is not None and section.convert is not None,
            "quant.api=torchao needs a quant.torchao section with convert",
        )
        require(
            cfg.freeze_observers_step is None,
            f"quant.freeze_observers_step={cfg.freeze_observers_step}: torchao fake quantization "
            "computes its scales every step and has no observers to freeze; use null",
        )
        convert = build("quant.torchao.convert", section.convert)
        if cfg.method == "qat":
            require(section.weight is not None, "quant.method=qat (api=torchao) needs quant.torchao.weight")
            weight = build("quant.torchao.weight", section.weight)
            if section.activation is not None:
                build("quant.torchao.activation", section.activation)
            shipped = getattr(convert, "weight_granularity", ao.PerAxis(0))
            require(
                weight.granularity == shipped,
                f"quant.torchao.weight fake-quantizes with {weight.granularity}, but quant.torchao.convert "
                f"({type(convert).__name__}) ships {shipped}; QAT must simulate what ships",
            )

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        assert cfg.torchao is not None, "check_config requires a quant.torchao section"
        self.section = cfg.torchao

    def qdq_unavailable(self) -> str | None:
        return "torchao's INT8 (tensor-subclass weights, per-token activation scales) has no ONNX QDQ export"

    def _is_target(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and name in self.targets

    def prepare(self, model: nn.Module) -> nn.Module:
        self.select_targets(model)
        if self.cfg.method == "qat":
            activation = self.section.activation
            config = qat.QATConfig(
                activation_config=build("quant.torchao.activation", activation) if activation else None,
                weight_config=build("quant.torchao.weight", self.section.weight or {}),
                step="prepare",
            )
            ao.quantize_(model, config, filter_fn=self._is_target)
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
        ao.quantize_(
            model, build("quant.torchao.convert", self.section.convert or {}), filter_fn=self._is_target
        )
        if self.tables:
            tables = set(self.tables)
            weight_only = ao.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=ao.PerAxis(0))
            ao.quantize_(model, weight_only, filter_fn=lambda module, name: name in tables)
        return model

    def count_quantized(self, model: nn.Module) -> int:
        return sum(
            isinstance(getattr(m, "weight", None), TorchAOBaseTensor)
            for m in model.modules()
            if isinstance(m, nn.Linear | nn.Embedding)
        )
