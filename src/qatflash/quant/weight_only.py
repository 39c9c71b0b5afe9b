"""Weight-only quantization of Linear layers, the LLM decode baselines: weights stored in int8 or int4,
activations kept in float.

At batch 1 a decoder's per-token step reads every weight once and does little arithmetic with it,
so its time is memory traffic: a weight stored in fewer bytes can be read faster, and weight-only
schemes exist for that. Whether a kernel turns the saved bytes into saved time is what the
side-by-side decode timing measures. Two recipes share these verbs (`quant.weight_only` says
what to store):

- `quant.api=packed`: torch's own CPU kernels, `_weight_int8pack_mm` (int8, one scale per output
  channel, float32 activations) and `_weight_int4pack_mm_for_cpu` (int4 with a scale and zero per
  group of input channels, bfloat16 activations: the kernel computes in bf16). torchao 0.18 does
  not route its weight-only configs to them on the CPU, hence this small recipe.
- `quant.api=bitsandbytes`: LLM.int8 (`Linear8bitLt`, outliers in float) and NF4 (`Linear4bit`),
  an optional extra (`.[bnb]`) with CPU and CUDA backends.

Neither trains or calibrates: `ptq_weight_only` converts the fine-tuned model's weights directly.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from qatflash.config import QuantConfig, WeightOnlyConfig
from qatflash.errors import ConfigError, require
from qatflash.quant.recipe import Recipe
from qatflash.quant.target import Target
from qatflash.quant.targeting import replace_module
from qatflash.storage import load_tensors

INT8_RANGE = 127
INT4_LEVELS = 15  # unsigned 0..15; torch's int4 kernels dequantize as (q - 8) * scale + zero
INT4_MIDPOINT = 8
# The layout argument of torch's int4 packing; 1 packs two values per byte for any shape it takes.
INNER_K_TILES = 1


class Int8WeightOnlyLinear(nn.Module):
    """y = x Wᵀ + b with W in int8 and one float32 scale per output channel (symmetric)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / INT8_RANGE).clamp(min=torch.finfo(torch.float32).tiny)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer(
            "weight_int8", torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8)
        )
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype)
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4WeightOnlyLinear(nn.Module):
    """y = x Wᵀ + b with W in int4, two values per byte, an asymmetric scale and zero per group of
    `group_size` input channels; the kernel takes and returns bfloat16."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape  # shapes checked by WeightOnlyRecipe.check_shape
        groups = linear.weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scales = ((high - low) / INT4_LEVELS).clamp(min=1e-8)
        levels = torch.round((groups - low) / scales).clamp(0, INT4_LEVELS).to(torch.int32)
        zeros = low + INT4_MIDPOINT * scales
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        packed = torch._convert_weight_to_int4pack_for_cpu(
            levels.reshape(out_features, in_features), INNER_K_TILES
        )
        self.register_buffer("weight_int4", packed)
        # (groups, out_features, 2): the layout _weight_int4pack_mm_for_cpu reads
        pairs = torch.stack([scales.squeeze(-1), zeros.squeeze(-1)], dim=-1).transpose(0, 1)
        self.register_buffer("scales_and_zeros", pairs.contiguous().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(
            flat, self.weight_int4, self.group_size, self.scales_and_zeros
        )
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


class WeightOnlyRecipe(Recipe):
    """Shared verbs: nothing to prepare, train or observe; convert swaps each target Linear for the
    module `quantized_linear` makes of it. Subclasses say which storage formats and devices they run."""

    methods = ("ptq_weight_only",)
    engines = ("x86", "fbgemm", "qnnpack", "onednn")
    composable = True  # convert swaps its own targets only
    weight_dtypes: ClassVar[tuple[str, ...]]
    # weight_dtype -> the multiple of output features its kernel packs at a time
    output_multiple: ClassVar[dict[str, int]] = {}
    # weight_dtype -> the group sizes its kernel takes (absent: any divisor of the inputs)
    group_sizes: ClassVar[dict[str, tuple[int, ...]]] = {}

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        super().check_config(cfg)
        require(cfg.weight_only is not None, f"quant.api={cfg.api} needs a quant.weight_only section")
        assert cfg.weight_only is not None
        allowed = cls.group_sizes.get(cfg.weight_only.weight_dtype)
        require(
            allowed is None or cfg.weight_only.group_size in allowed,
            f"quant.weight_only.group_size={cfg.weight_only.group_size}: quant.api={cfg.api}'s "
            f"{cfg.weight_only.weight_dtype} kernel takes {list(allowed or ())}",
        )
        require(
            cfg.weight_only.weight_dtype in cls.weight_dtypes,
            f"quant.weight_only.weight_dtype={cfg.weight_only.weight_dtype}: quant.api={cfg.api} stores "
            f"{list(cls.weight_dtypes)}",
        )
        require(
            cfg.embeddings == "float",
            f"quant.embeddings={cfg.embeddings}: quant.api={cfg.api} quantizes Linear weights only; use float",
        )

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        assert cfg.weight_only is not None, "check_config requires a quant.weight_only section"
        self.weight_only: WeightOnlyConfig = cfg.weight_only

    def select_targets(self, model: nn.Module) -> list[str]:
        """The targets, each checked against the kernel's shape rules (before any training)."""
        targets = super().select_targets(model)
        for name in targets:
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear), f"{name} is a target, so a Linear"
            self.check_shape(name, linear.out_features, linear.in_features)
        return targets

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Refuse a Linear whose shape the kernel cannot pack, naming it (exclude it by quant.targets)."""
        group = self.weight_only.group_size
        require(
            group is None or in_features % group == 0,
            f"quant.weight_only.group_size={group} does not divide {name}'s {in_features} input channels; "
            f"choose a divisor, or leave it out with quant.targets.exclude=[{name}]",
        )
        rows = self.output_multiple.get(self.weight_only.weight_dtype, 1)
        require(
            out_features % rows == 0,
            f"{name} has {out_features} outputs; quant.api={self.cfg.api} packs "
            f"{self.weight_only.weight_dtype} weights {rows} output rows at a time; leave it out with "
            f"quant.targets.exclude=[{name}]",
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        self.select_targets(model)
        return model

    def is_prepared(self, model: nn.Module) -> bool:
        return False

    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        """Nothing to switch: weight-only PTQ has no fake quantization or observers."""

    # weight_dtype -> the format its converted Linears compute
    formats: ClassVar[dict[str, str]]

    def target(self) -> Target:
        return Target(self.formats[self.weight_only.weight_dtype], "cpu", "float32")

    def convert(self, model: nn.Module) -> nn.Module:
        model.eval()
        for name in self.targets:
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear), f"{name} is a target, so a Linear"
            replace_module(model, name, self.quantized_linear(linear))
        return model.eval()  # the new modules too: bitsandbytes' int8 computes otherwise in training

    @abstractmethod
    def quantized_linear(self, linear: nn.Linear) -> nn.Module:
        """The weight-only module that replaces `linear` (same forward signature and output)."""

    def qdq_unavailable(self) -> str | None:
        return f"quant.api={self.cfg.api} keeps activations in float: there is no QDQ graph of it to export"


class PackedRecipe(WeightOnlyRecipe):
    """torch's CPU weight-only kernels (int8 per channel, int4 per group); CPU only."""

    weight_dtypes = ("int8", "int4")
    formats: ClassVar[dict[str, str]] = {"int8": "int8_wo_packed", "int4": "int4_wo_packed"}
    output_multiple: ClassVar[dict[str, int]] = {"int4": 16}  # _convert_weight_to_int4pack_for_cpu
    group_sizes: ClassVar[dict[str, tuple[int, ...]]] = {"int4": (32, 64, 128, 256)}

    def quantized_linear(self, linear: nn.Linear) -> nn.Module:
        if self.weight_only.weight_dtype == "int8":
            return Int8WeightOnlyLinear(linear)
        assert self.weight_only.group_size is not None, "WeightOnlyConfig requires a group size for int4"
        return Int4WeightOnlyLinear(linear, self.weight_only.group_size)

    def count_quantized(self, model: nn.Module) -> int:
        return sum(isinstance(m, Int8WeightOnlyLinear | Int4WeightOnlyLinear) for m in model.modules())


class BitsAndBytesRecipe(WeightOnlyRecipe):
    """bitsandbytes' LLM.int8 (`weight_dtype: int8`) and NF4 (`nf4`, in blocks of `group_size`)."""

    weight_dtypes = ("int8", "nf4")
    formats: ClassVar[dict[str, str]] = {"int8": "llm_int8_bnb", "nf4": "nf4_wo_bnb"}
    # NF4 on the CPU: bitsandbytes repacks 32 output rows at a time for its bf16 kernel
    output_multiple: ClassVar[dict[str, int]] = {"nf4": 32}

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        super().check_config(cfg)
        _bitsandbytes()

    def devices(self) -> tuple[str, ...]:
        """What bitsandbytes has a backend for in this install, the CPU first: where a job ships."""
        return tuple(sorted(_bitsandbytes().supported_torch_devices, key=lambda device: device != "cpu"))

    def target(self) -> Target:
        """On the first device of `devices()`: an install without a CPU backend ships on CUDA, and
        is refused before data loads where there is none."""
        return Target(self.formats[self.weight_only.weight_dtype], self.devices()[0], "float32")

    def quantized_linear(self, linear: nn.Linear) -> nn.Module:
        bnb = _bitsandbytes()
        weight = linear.weight.detach().float().clone()
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), False)
        if self.weight_only.weight_dtype == "int8":
            module = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=self.weight_only.outlier_threshold,
            )
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            module = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            module.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", blocksize=self.weight_only.group_size
            )
        if bias is not None:
            module.bias = bias
        return module.to(
            linear.weight.device
        )  # bitsandbytes quantizes the weight when it is moved to a device

    def load(self, path: Path, skeleton: Callable[[], nn.Module]) -> nn.Module:
        """Into a converted skeleton: int8 weights are copied into its parameters (bitsandbytes keeps
        their scales on the parameter object, which an assigned tensor would drop), and each NF4
        weight is rebuilt from its packed data and stored quantization state, as transformers does."""
        bnb = _bitsandbytes()
        state = load_tensors(path, "quantized artifact")
        model = self.converted(self.prepare(skeleton()))
        device = self.target().torch_device
        rebuilt = []
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                key = f"{name}.weight"
                stats = {k[len(key) + 1 :]: state.pop(k) for k in list(state) if k.startswith(f"{key}.")}
                module.weight = bnb.nn.Params4bit.from_prequantized(
                    state.pop(key), stats, requires_grad=False, device=device
                )
                rebuilt.append(key)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(rebuilt):
            raise RuntimeError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")
        return model.eval()

    def count_quantized(self, model: nn.Module) -> int:
        bnb = _bitsandbytes()
        return sum(isinstance(m, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit) for m in model.modules())


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "quant.api=bitsandbytes needs the bitsandbytes package: pip install 'qatflash[bnb]'"
        ) from None
    return bitsandbytes


class GptqRecipe(Recipe):
    """GPTQ: refused, with the reason, until a maintained implementation fits this project's pins."""

    methods = ("ptq_weight_only",)

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        raise ConfigError(
            "quant.api=gptq: GPTQ's kernels are CUDA-only, and no maintained implementation fits this "
            "project's pins (gptqmodel 7.7 requires torch>=2.14.1; torch is pinned to 2.13.0); for "
            "int4 weights use quant=wo_packed_int4 (CPU) or wo_bnb_nf4"
        )
