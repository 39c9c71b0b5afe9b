"""Quantization recipes (torch.ao eager: dynamic PTQ, static PTQ, QAT), targeting, the QAT callback, artifacts."""

from qatflash.quant.callback import QuantizationAwareTraining
from qatflash.quant.eager import EagerRecipe, count_quantized

__all__ = ["EagerRecipe", "QuantizationAwareTraining", "count_quantized"]
