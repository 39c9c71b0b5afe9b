"""What a recipe's conversion produces, as data: its number format, the device its kernels run on,
the dtype of the float tensors around them, and the CUDA compute capability those kernels need.

A quantized model is converted, tested, saved and timed where its target says, and nowhere else:
this is the one authority for a quantized model's placement (`qatflash.placement` moves it there).
"INT8 on the CPU in float32" is one target among others (FP8 rowwise on a CUDA GPU in bfloat16,
tinygemm's int4 there, MXFP8 emulated on a CPU in bfloat16). A machine that cannot run a target's
kernels is named before any data is loaded (`unreachable`); a QAT job may still train there with
fake quantization, and then records its model as not shipped instead of shipping something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Target:
    """`format/device/dtype` (int8/cpu/float32, fp8_e4m3_rowwise/cuda/bfloat16, ...), and the CUDA
    compute capability (major, minor) the kernels need, if any."""

    format: str
    device: str
    dtype: str
    capability: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        assert self.device in DEVICES and self.dtype in DTYPES, f"no such target: {self}"

    def __str__(self) -> str:
        return f"{self.format}/{self.device}/{self.dtype}"

    @property
    def torch_device(self) -> torch.device:
        """The device the model is placed on (the first GPU for cuda: `place` needs an index)."""
        return torch.device("cuda", 0) if self.device == "cuda" else torch.device("cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def needs(self) -> str:
        """What the target asks of a machine, in words."""
        if self.device == "cpu":
            return "a CPU"
        if self.capability is None:
            return "a CUDA GPU"
        return f"a CUDA GPU of compute capability ≥ {self.capability[0]}.{self.capability[1]}"

    def unreachable(self) -> str | None:
        """Why this machine cannot run the target's kernels, or None when it can."""
        if self.device == "cpu":
            return None
        if not torch.cuda.is_available():
            return f"{self} needs {self.needs()}; this machine has no CUDA device"
        have = torch.cuda.get_device_capability(0)
        if self.capability is not None and have < self.capability:
            name = torch.cuda.get_device_name(0)
            return f"{self} needs {self.needs()}; {name} has {have[0]}.{have[1]}"
        return None

    def record(self) -> dict[str, str]:
        """What results.json says of it (model.target, model.format)."""
        return {"target": str(self), "format": self.format}
