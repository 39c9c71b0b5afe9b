"""A mixed-precision recipe: named parts, each a recipe of its own over the modules its targets select.

`quant.api=mixed` with `quant.parts: {int8: <a quant config>, int4: <another>}` quantizes one model
in more than one precision: every part prepares, switches and converts its own modules, in turn,
and the model counts as quantized when every part's modules are. This is how a sensitivity search's
choice (`qatflash.sensitivity`) becomes a recipe a sweep trains and tests like any other. Parts
share one API whose recipes compose (each touches only its own modules: torchao's `quantize_` with a
filter), one method, and the device and dtype their products run in; no module is in two parts,
and at most one part quantizes the embedding table. A choice of a single precision needs no parts:
it is that precision's recipe with the chosen modules as its targets.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qatflash.config import QuantConfig
from qatflash.errors import require
from qatflash.quant import RECIPES, make_recipe
from qatflash.quant.recipe import Recipe
from qatflash.quant.target import Target


class MixedRecipe(Recipe):
    """The parts of `quant.parts`, each its own recipe, applied to one model in the order written."""

    methods = ("ptq_dynamic", "ptq_static", "ptq_weight_only", "qat")

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        super().check_config(cfg)
        parts = cfg.parts or {}
        require(len(parts) >= 2, f"quant.api=mixed needs two parts or more, not {list(parts)}")
        apis = {part.api for part in parts.values()}
        api = next(iter(apis))
        require(len(apis) == 1, f"quant.parts mix APIs {sorted(apis)}; the parts of a mixed recipe share one")
        require(
            RECIPES.load(api).composable,
            f"quant.parts of quant.api={api}: its recipes do not compose (each prepares the whole model); "
            "mix the precisions of a composing API (torchao)",
        )
        methods = {name: part.method for name, part in parts.items()}
        require(
            set(methods.values()) == {cfg.method},
            f"quant.parts' methods {methods} differ from quant.method={cfg.method}; a mix has one method",
        )
        tables = [name for name, part in parts.items() if part.embeddings == "int8"]
        require(len(tables) <= 1, f"quant.parts {tables} each quantize the embedding table; one may")
        for name in ("distill", "range_lr", "lora"):
            require(
                all(getattr(part, name) is None for part in parts.values()),
                f"quant.parts.*.{name}: set it on the mixed recipe (quant.{name}), not a part",
            )
        require(
            cfg.range_lr is None and cfg.lora is None,
            "quant.api=mixed learns no ranges and trains no adapters yet: quant.range_lr and quant.lora must be null",
        )

    @classmethod
    def ranges_unlearnable(cls, cfg: QuantConfig) -> str | None:
        return "quant.api=mixed learns no ranges yet"

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        assert cfg.parts is not None, "QuantConfig requires quant.parts with api=mixed"
        self.parts: dict[str, Recipe] = {name: make_recipe(part) for name, part in cfg.parts.items()}
        targets = {name: part.target() for name, part in self.parts.items()}
        places = {(t.device, t.dtype) for t in targets.values()}
        require(
            len(places) == 1,
            f"quant.parts make products that run in different places { ({n: str(t) for n, t in targets.items()}) }; "
            "one model runs on one device in one dtype",
        )

    def target(self) -> Target:
        """The parts' formats joined (int8+int4), where they all run, on the highest capability any needs."""
        targets = [part.target() for part in self.parts.values()]
        formats = "+".join(dict.fromkeys(t.format for t in targets))
        needed = [t.capability for t in targets if t.capability is not None]
        return Target(formats, targets[0].device, targets[0].dtype, max(needed) if needed else None)

    def scheme(self) -> dict[str, Any]:
        return {
            "target": str(self.target()),
            "modules": sorted(self.selected),
            "parts": {name: part.scheme() for name, part in self.parts.items()},
        }

    def select_targets(self, model: nn.Module) -> list[str]:
        """Each part's targets, refused where two parts select one module."""
        owners: dict[str, str] = {}
        for name, part in self.parts.items():
            for module in (*part.select_targets(model), *part.tables):
                require(
                    module not in owners,
                    f"quant.parts.{owners.get(module)} and quant.parts.{name} both select {module}; "
                    "a module is quantized in one precision",
                )
                owners[module] = name
        self.targets = [t for part in self.parts.values() for t in part.targets]
        self.tables = [t for part in self.parts.values() for t in part.tables]
        return self.targets

    def prepare(self, model: nn.Module) -> nn.Module:
        self.select_targets(model)
        for part in self.parts.values():
            model = part.prepare(model)
        return model

    def is_prepared(self, model: nn.Module) -> bool:
        return any(part.is_prepared(model) for part in self.parts.values())

    def delays_fake_quant(self) -> bool:
        return all(part.delays_fake_quant() for part in self.parts.values())

    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        for part in self.parts.values():
            part.set_phase(model, fake_quant, observe)

    def convert(self, model: nn.Module) -> nn.Module:
        for part in self.parts.values():
            model = part.convert(model)
        return model

    def check_converted(self, model: nn.Module) -> int:
        """Refused naming any part's module left float; then the count of the whole, as every recipe's."""
        left = [
            f"{module} ({name})"
            for name, part in self.parts.items()
            for module in part.selected
            if part.count_quantized(model.get_submodule(module)) == 0
        ]
        if left:
            raise RuntimeError(
                f"quant.api=mixed left {len(left)} selected modules float: {', '.join(left[:4])}"
            )
        return super().check_converted(model)

    def count_quantized(self, model: nn.Module) -> int:
        first = next(iter(self.parts.values()))  # the parts share an API: one count covers them all
        return first.count_quantized(model)
