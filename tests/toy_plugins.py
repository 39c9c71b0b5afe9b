"""A task, a quantization recipe and a timing backend that exist only in the tests: each reaches a
job through YAML on a Hydra search path naming its `module:Class`, with no file under src/ edited."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from qatflash.quant.recipe import Recipe
from qatflash.quant.target import Target
from qatflash.tasks.classification import ClassificationTask
from qatflash.timing.backends import TimingBackend


class MacroF1Task(ClassificationTask):
    """Classification judged by macro-F1 instead of accuracy."""

    headline = "test/f1"
    quality = "macro_f1"


class Float16Recipe(Recipe):
    """Ships the targeted Linears' weights in float16 (computed in float16 on the way, float32 outside)."""

    methods = ("ptq_dynamic",)

    def target(self) -> Target:
        return Target("float16_weights", "cpu", "float32")

    def prepare(self, model: nn.Module) -> nn.Module:
        self.select_targets(model)
        return model

    def is_prepared(self, model: nn.Module) -> bool:
        return True

    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        pass

    def convert(self, model: nn.Module) -> nn.Module:
        for name in self.targets:
            model.get_submodule(name).half().register_forward_pre_hook(_to_half)
            model.get_submodule(name).register_forward_hook(_to_float)
        return model.eval()

    def count_quantized(self, model: nn.Module) -> int:
        return sum(m.weight.dtype == torch.float16 for m in model.modules() if isinstance(m, nn.Linear))


def _to_half(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(a.half() for a in args)


def _to_float(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output.float()


class CountingBackend(TimingBackend):
    """Eager torch, counting the forwards it runs (so a test can tell it ran them)."""

    name = "counting"
    forwards: ClassVar[int] = 0

    def wrap(self, model: nn.Module, example: dict[str, torch.Tensor], max_len: int | None) -> nn.Module:
        return _Counted(model)


class _Counted(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> object:
        CountingBackend.forwards += 1
        return self.model(**inputs)
