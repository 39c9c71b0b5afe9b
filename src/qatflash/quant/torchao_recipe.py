"""torchao recipes: `quantize_(model, QATConfig(...))` to fake-quantize, torchao's tensor subclasses to ship.

torchao is where PyTorch's quantization lives on (torch.ao.quantization is deprecated in torch 2.13).
A recipe names torchao's own config classes in YAML (`quant.torchao.activation`, `weight`,
`convert`: `_target_` plus keyword arguments), so a new torchao scheme is one YAML file; the
arguments are checked against the class's signature when the config is read, before any data is
loaded, and dtype, granularity and enum names go through `resolve`. QAT without `weight` derives
its fake quantization from the convert config itself (`QATConfig(base_config)`), so that it
simulates what ships by construction. Fake quantization is dynamic: scales are computed at every
step, so there are no observers to freeze.

Learned ranges (`quant.range_lr`) make the weights' fake quantization static with trainable
scales (`IntxFakeQuantizeConfig(is_dynamic=False, range_learning=True)`), set from the weights when
the model is prepared and again where fake quantization starts, and ship them through
`QATConfig(base_config, step="convert")`, which hands them to the convert config as its scales.

What a convert config produces, and what it asks of a machine, is decided by its class (`product`):
FP8 rowwise needs a CUDA GPU of compute capability 8.9 and bfloat16 weights, tinygemm's int4 a
CUDA GPU, NVFP4 compute capability 10.0 (its fake quantization too), MX emulated runs anywhere in
bfloat16. A class not listed there (a torchao scheme no shipped YAML uses) runs where torchao's
CPU kernels do, in float32, under its own name.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torchao.quantization as ao
from torch import nn
from torchao.quantization import qat
from torchao.quantization.quant_primitives import ZeroPointDomain
from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER
from torchao.utils import TorchAOBaseTensor

from qatflash.config import QuantConfig
from qatflash.errors import ConfigError, require
from qatflash.quant.recipe import Recipe
from qatflash.quant.target import Target

_GRANULARITIES = {
    "per_token": ao.PerToken,
    "per_tensor": ao.PerTensor,
    "per_channel": lambda: ao.PerAxis(0),
    "per_row": ao.PerRow,
}


def _enums() -> dict[str, type[Enum]]:
    """The enums a YAML value may name, by the end of the keyword that takes it (act_mapping_type
    too). MX's module is a prototype: imported when a value is resolved, not with this module."""
    from torchao.prototype.mx_formats import ScaleCalculationMode

    return {
        "mapping_type": ao.MappingType,
        "zero_point_domain": ZeroPointDomain,
        "kernel_preference": KernelPreference,
        "scaling_mode": ScaleCalculationMode,
    }


def resolve(key: str, value: Any) -> Any:
    """A YAML value as torchao takes it, by what its keyword (the end of `key`) names: `*dtype`/`*precision` a torch
    dtype name (int4, uint4, int8, float8_e4m3fn, bfloat16, ...), `*granularity` one of per_token,
    per_tensor, per_channel, per_row or per_group:<n> (per_group:None is per channel, so that
    `${..group_size}` may be null), and `mapping_type`, `zero_point_domain`, `kernel_preference`,
    `scaling_mode` a member of torchao's enum of that name (asymmetric, float, emulated, rceil, ...);
    anything else as it is."""
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
    enum = next((e for keyword, e in _enums().items() if key.endswith(keyword)), None)
    if enum is None:
        return value
    require(value.upper() in enum.__members__, f"{key}={value!r}: use one of {list(enum.__members__)}")
    return enum[value.upper()]


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
    except (TypeError, ValueError, AssertionError) as error:
        raise ConfigError(f"{name}: {attribute}({kwargs}) is refused by torchao: {error}") from None


@dataclass(frozen=True)
class Product:
    """What a convert config makes: its format, where its kernels run (the first device is where a
    job ships it), in which dtype, on which CUDA compute capability, and the multiples of
    (in_features, out_features) its kernels take (torchao skips any other Linear with a log line)."""

    format: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtype: str = "float32"
    capability: tuple[int, int] | None = None
    multiple_of: tuple[int, int] = (1, 1)
    # Whether fake quantization itself runs the format's kernels (NVFP4: an fp4 matmul).
    fake_quant_on_kernels: bool = False

    def target(self) -> Target:
        return Target(self.format, self.devices[0], self.dtype, self.capability)


def _bits(dtype: torch.dtype) -> str:
    return re.sub(r"\D", "", str(dtype))


def _float8(config: Any) -> Product:
    rows = all(isinstance(g, ao.PerRow) for g in config.granularity)
    fp8 = str(config.weight_dtype).removeprefix("torch.float8_").removesuffix("fn")
    scaled = "rowwise" if rows else "tensorwise"
    return Product(f"fp8_{fp8}_{scaled}", ("cuda",), "bfloat16", (8, 9), (16, 16))


def _int4(config: Any) -> Product:
    packing = str(getattr(config.int4_packing_format, "value", config.int4_packing_format))
    kernel = "tinygemm" if packing == "tile_packed_to_4d" else packing
    return Product(f"int4_wo_{kernel}", ("cuda",), "bfloat16", (8, 0), (config.group_size, 1))


def _mx(config: Any) -> Product:
    bits = "fp8" if "float8" in str(config.weight_dtype) else "fp4"
    if config.kernel_preference == KernelPreference.EMULATED:
        return Product(f"mx{bits}_emulated", ("cpu", "cuda"), "bfloat16", None, (config.block_size, 1))
    return Product(f"mx{bits}", ("cuda",), "bfloat16", (10, 0), (config.block_size, 1))


# By convert config class name; anything else gets `_generic`.
PRODUCTS: dict[str, Callable[[Any], Product]] = {
    "Int8WeightOnlyConfig": lambda c: Product("int8_wo"),
    "Int8DynamicActivationInt8WeightConfig": lambda c: Product("8da8w"),
    "Int8DynamicActivationIntxWeightConfig": lambda c: Product(f"8da{_bits(c.weight_dtype)}w"),
    "Float8DynamicActivationFloat8WeightConfig": _float8,
    "Int4WeightOnlyConfig": _int4,
    "MXDynamicActivationMXWeightConfig": _mx,
    "NVFP4DynamicActivationNVFP4WeightConfig": lambda c: Product(
        "nvfp4", ("cuda",), "bfloat16", (10, 0), (16, 16), fake_quant_on_kernels=True
    ),
}


def _generic(config: Any) -> Product:
    """A config class without an entry: its name in snake case (IntxWeightOnlyConfig ->
    intx_weight_only) with its weight dtype, on torchao's CPU kernels in float32."""
    name = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(config).__name__.removesuffix("Config")).lower()
    dtype = getattr(config, "weight_dtype", None)
    return Product(f"{name}_{str(dtype).removeprefix('torch.')}" if isinstance(dtype, torch.dtype) else name)


def product(config: Any) -> Product:
    """What `config` (a torchao convert config) makes and asks of a machine."""
    return PRODUCTS.get(type(config).__name__, _generic)(config)


# Fake quantization a QAT job can switch off until `quant.fake_quant_start_step` (MX and NVFP4
# modules have no switch: their fake quantization runs from the first step).
def _switches(model: nn.Module) -> list[qat.FakeQuantizerBase]:
    return [m for m in model.modules() if isinstance(m, qat.FakeQuantizerBase)]


def _probe_prepare(config: Any) -> nn.Module:
    """QAT's prepare of `config` on a small Linear its kernels take: what fails there (a packing
    torchao cannot derive fake quantization from) fails before any data is loaded."""
    probe = nn.Sequential(nn.Linear(256, 256))
    try:
        ao.quantize_(probe, config)
    except (ValueError, NotImplementedError, AssertionError) as error:
        raise ConfigError(f"quant.torchao: torchao cannot prepare QAT from it: {error}") from None
    return probe


class TorchaoRecipe(Recipe):
    """QAT (`qat`), dynamic PTQ (`ptq_dynamic`) or weight-only PTQ (`ptq_weight_only`) of the targeted
    Linears, with weight-only int8 embeddings."""

    methods = ("ptq_dynamic", "ptq_weight_only", "qat")
    composable = True  # quantize_ touches only what its filter selects

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
        if cfg.method != "qat":
            return
        if section.weight is None:  # derived from what ships
            probe = _probe_prepare(qat.QATConfig(convert, step="prepare"))
            require(
                bool(_switches(probe)) or cfg.fake_quant_start_step in (0, None),
                f"quant.fake_quant_start_step={cfg.fake_quant_start_step}: torchao's fake quantization "
                f"for {type(convert).__name__} cannot be switched off, so it runs from step 0; use 0 or null",
            )
            return
        weight = _weight_config(cfg)
        if section.activation is not None:
            build("quant.torchao.activation", section.activation)
        gaps = _simulation_gaps(weight, convert)
        require(
            not gaps,
            f"quant.torchao.weight fake-quantizes otherwise than quant.torchao.convert "
            f"({type(convert).__name__}) ships: {'; '.join(gaps)}; QAT must simulate what ships",
        )

    @classmethod
    def ranges_unlearnable(cls, cfg: QuantConfig) -> str | None:
        section = cfg.torchao
        if section is None or section.weight is None or section.convert is None:
            return "quant.api=torchao learns ranges of a quant.torchao.weight fake-quantize config; spell one out"
        weight = build("quant.torchao.weight", section.weight)
        if not isinstance(weight, qat.IntxFakeQuantizeConfig) or not weight.is_symmetric:
            return f"torchao learns the ranges of a symmetric IntxFakeQuantizeConfig only, not {weight}"
        convert = build("quant.torchao.convert", section.convert)
        handler = _QUANTIZE_CONFIG_HANDLER.get(type(convert))
        if handler is None or "custom_scale" not in inspect.signature(handler).parameters:
            return (
                f"{type(convert).__name__} takes no learned scales (torchao ships them into "
                "IntxWeightOnlyConfig and Int8DynamicActivationIntxWeightConfig)"
            )
        return None

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        assert cfg.torchao is not None, "check_config requires a quant.torchao section"
        self.section = cfg.torchao
        self.convert_config = build("quant.torchao.convert", self.section.convert or {})
        self.product = product(self.convert_config)

    def target(self) -> Target:
        return self.product.target()

    def devices(self) -> tuple[str, ...]:
        return self.product.devices

    def delays_fake_quant(self) -> bool:
        """Spelled-out fake quantizers have a switch; one derived from the convert config may not
        (MX's and NVFP4's modules)."""
        return self.section.weight is not None or bool(_switches(_probe_prepare(self._qat_config())))

    def fake_quant_unreachable(self) -> str | None:
        if not self.product.fake_quant_on_kernels:
            return None
        return self.target().unreachable()

    def qdq_unavailable(self) -> str | None:
        return "torchao's quantized tensors (tensor-subclass weights, per-token activation scales) have no ONNX QDQ export"

    def select_targets(self, model: nn.Module) -> list[str]:
        """The targets, each checked against the shapes the convert config's kernels take: torchao
        would skip one they cannot (a log line only) and ship it float."""
        targets = super().select_targets(model)
        k, n = self.product.multiple_of
        misfits = [
            f"{name} ({linear.in_features}→{linear.out_features})"
            for name in targets
            if (linear := model.get_submodule(name)).in_features % k or linear.out_features % n
        ]
        require(
            not misfits,
            f"{self.product.format} takes Linears whose in_features are multiples of {k} and out_features "
            f"of {n} ({type(self.convert_config).__name__}); {len(misfits)} targets are not: "
            f"{', '.join(misfits[:4])}{' ...' if len(misfits) > 4 else ''}; exclude them (quant.targets) "
            "or choose a size that divides them",
        )
        return targets

    def _is_target(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and name in self.targets

    def prepare(self, model: nn.Module) -> nn.Module:
        self.select_targets(model)
        if self.cfg.method == "qat":
            ao.quantize_(model, self._qat_config(), filter_fn=self._is_target)
        if self.cfg.range_lr is not None:
            # The scales become parameters here, before Lightning builds the optimizer.
            example = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
            with torch.no_grad():
                qat.initialize_fake_quantizers(model, (example,))
        return model

    def _qat_config(self) -> qat.QATConfig:
        if self.section.weight is None:
            return qat.QATConfig(self.convert_config, step="prepare")
        activation = self.section.activation
        return qat.QATConfig(
            activation_config=build("quant.torchao.activation", activation) if activation else None,
            weight_config=_weight_config(self.cfg),
            step="prepare",
        )

    def range_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [
            tensor
            for quantizer, _ in _learning(model)
            for tensor in (quantizer.scale, quantizer.zero_point)
            if isinstance(tensor, nn.Parameter)
        ]

    def initialize_ranges(self, model: nn.Module) -> None:
        """The learned scales recomputed, in place (the optimizer holds them), by torchao's own
        rule from the weights as they are now: a model trained in float first has moved since."""
        for quantizer, weight in _learning(model):
            learned = quantizer.scale, quantizer.zero_point
            _set_ranges(quantizer, None, None)  # torchao computes them afresh on a forward
            with torch.no_grad():
                quantizer(weight)
                for tensor, fresh in zip(learned, (quantizer.scale, quantizer.zero_point), strict=True):
                    tensor.copy_(fresh)
            _set_ranges(quantizer, *learned)

    def is_prepared(self, model: nn.Module) -> bool:
        """Whether `model` holds torchao's fake-quantized Linears (FakeQuantizedLinear, and MX's and
        NVFP4's own classes, which share no base but nn.Linear and a way back: `to_linear`)."""
        return any(
            type(m) is not nn.Linear and isinstance(m, nn.Linear) and hasattr(m, "to_linear")
            for m in model.modules()
        )

    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        for module in _switches(model):
            module.enabled = fake_quant

    def convert(self, model: nn.Module) -> nn.Module:
        model.eval()
        # From QAT: back to plain Linear with the trained weights (and learned scales), then converted.
        config = (
            qat.QATConfig(self.convert_config, step="convert")
            if self.is_prepared(model)
            else self.convert_config
        )
        ao.quantize_(model, config, filter_fn=self._is_target)
        if self.tables:
            tables = set(self.tables)
            weight_only = ao.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=ao.PerAxis(0))
            ao.quantize_(model, weight_only, filter_fn=lambda module, name: name in tables)
        return model

    def check_converted(self, model: nn.Module) -> int:
        """Refused naming the targets torchao left float (its configs skip, with a log line only,
        any Linear whose shape their kernels cannot take)."""
        left = [name for name in self.selected if not _quantized(model.get_submodule(name))]
        require(
            not left,
            f"{type(self.convert_config).__name__} left {len(left)} of {len(self.selected)} targets float "
            f"(torchao skips a module whose shape its kernels cannot take): {', '.join(left[:4])}",
        )
        return super().check_converted(model)

    def count_quantized(self, model: nn.Module) -> int:
        return sum(_quantized(m) for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding))


def _weight_config(cfg: QuantConfig) -> Any:
    """QAT's weight fake-quantize config; with learned ranges, static with trainable scales."""
    assert cfg.torchao is not None and cfg.torchao.weight is not None, "the caller checks it is spelled out"
    spec = cfg.torchao.weight
    if cfg.range_lr is not None:
        spec = {**spec, "is_dynamic": False, "range_learning": True}
    return build("quant.torchao.weight", spec)


def _set_ranges(quantizer: nn.Module, scale: torch.Tensor | None, zero_point: torch.Tensor | None) -> None:
    """Replace a fake quantizer's scale and zero point, parameters or not (a module refuses a
    plain tensor, or None turned into a tensor, under a name registered as a parameter)."""
    for name, value in (("scale", scale), ("zero_point", zero_point)):
        delattr(quantizer, name)
        setattr(quantizer, name, value)


def _learning(model: nn.Module) -> list[tuple[qat.IntxFakeQuantizer, torch.Tensor]]:
    """Each weight fake quantizer that learns its range, with the weight it quantizes."""
    return [
        (module.weight_fake_quantizer, module.weight)
        for module in model.modules()
        if isinstance(getattr(module, "weight_fake_quantizer", None), qat.IntxFakeQuantizer)
        and module.weight_fake_quantizer.config.range_learning
    ]


def _quantized(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)


def _simulation_gaps(weight: Any, convert: Any) -> list[str]:
    """How an explicit weight fake-quantization differs from what `convert` ships: its granularity
    (per channel unless the config says otherwise, per group for Int4WeightOnlyConfig) and, for
    tinygemm's int4, the asymmetric uint4 with a float zero point it computes."""
    group = getattr(convert, "group_size", None)
    shipped = getattr(convert, "weight_granularity", ao.PerGroup(group) if group else ao.PerAxis(0))
    gaps = (
        []
        if weight.granularity == shipped
        else [f"granularity {weight.granularity} where it ships {shipped}"]
    )
    if product(convert).format == "int4_wo_tinygemm":
        tinygemm = (torch.uint4, False, ZeroPointDomain.FLOAT)
        found = (weight.dtype, weight.is_symmetric, weight.zero_point_domain)
        if found != tinygemm:
            gaps.append(f"(dtype, symmetric, zero point domain) {found} where it ships {tinygemm}")
    return gaps
