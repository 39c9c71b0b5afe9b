"""Quantization recipes (torch.ao eager, torchao, pt2e), name-based targeting, the QAT callback, artifacts."""

from __future__ import annotations

from qatflash.config import QuantConfig
from qatflash.quant.callback import QuantizationAwareTraining
from qatflash.quant.recipe import Recipe


def make_recipe(cfg: QuantConfig) -> Recipe:
    """The recipe for `quant.api`; torchao is imported only by the recipes that use it."""
    if cfg.api == "torchao":
        from qatflash.quant.torchao_recipe import TorchaoRecipe

        return TorchaoRecipe(cfg)
    if cfg.api == "pt2e":
        from qatflash.quant.pt2e import Pt2eRecipe

        return Pt2eRecipe(cfg)
    from qatflash.quant.eager import EagerRecipe

    return EagerRecipe(cfg)


__all__ = ["QuantizationAwareTraining", "Recipe", "make_recipe"]
