"""Quantization recipes (torch.ao eager, torchao, pt2e, weight-only: torch's packed kernels, bitsandbytes) behind one set of verbs (recipe.py), name-based
targeting, the QAT callback, INT8 artifacts, and shipping a model as INT8 (ship.py).

`quant.api` names a recipe class in RECIPES, imported only when a run uses it: torchao is loaded by
the torchao recipes alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatflash.registry import Registry

if TYPE_CHECKING:
    from qatflash.config import QuantConfig
    from qatflash.quant.recipe import Recipe

RECIPES: Registry[type[Recipe]] = Registry(
    "quant.api",
    {
        "eager": "qatflash.quant.eager:EagerRecipe",
        "torchao": "qatflash.quant.torchao_recipe:TorchaoRecipe",
        "pt2e": "qatflash.quant.pt2e:Pt2eRecipe",
        "packed": "qatflash.quant.weight_only:PackedRecipe",
        "bitsandbytes": "qatflash.quant.weight_only:BitsAndBytesRecipe",
        "gptq": "qatflash.quant.weight_only:GptqRecipe",
        "mixed": "qatflash.quant.mixed:MixedRecipe",
    },
    group="qatflash.quant_apis",
)


def make_recipe(cfg: QuantConfig) -> Recipe:
    """The recipe of `quant.api`, built for this config."""
    return RECIPES.load(cfg.api)(cfg)
