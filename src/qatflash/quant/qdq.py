"""The QDQ form of a prepared torch.ao eager model: what ONNX Runtime runs as that recipe's INT8.

torch.ao's converted INT8 modules (packed fbgemm/qnnpack weights) cannot be exported to ONNX, but
the prepared model holds everything they were made from: each FakeQuantize (QAT) or observer
(static PTQ) knows its scale, zero point and range. Here every one of them becomes an explicit
quantize -> dequantize pair, and every targeted Linear an int8 weight behind a dequantize, using
PyTorch's `quantized_decomposed` ops, which the ONNX exporter writes as QuantizeLinear /
DequantizeLinear. ONNX Runtime then fuses those patterns into its own INT8 kernels, so the ONNX
model carries the quantization the recipe learned rather than a new one from ONNX Runtime's
quantizer, and its file holds int8 weights.

The token-embedding table (`quant.embeddings=int8`) is stored int8 per row, symmetric: ONNX's
DequantizeLinear takes integer zero points only, unlike the float per-row zero points of torch's
quantized Embedding, so the ONNX model's accuracy is measured on its own, never assumed.
"""

from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn import qat as nnqat

_decomposed = torch.ops.quantized_decomposed
_INT_DTYPES = {torch.quint8: torch.uint8, torch.qint8: torch.int8}


class _Grid:
    """Scale(s), zero point(s) and integer range of one quantizer, read from a FakeQuantize or observer."""

    def __init__(self, quantizer: tq.FakeQuantizeBase | tq.ObserverBase) -> None:
        if isinstance(quantizer, tq.FakeQuantizeBase):
            scale, zero_point = quantizer.scale, quantizer.zero_point  # what the fake quantization applied
        else:
            scale, zero_point = quantizer.calculate_qparams()  # what torch.ao's convert would use
        self.dtype = _INT_DTYPES[quantizer.dtype]
        self.quant_min, self.quant_max = quantizer.quant_min, quantizer.quant_max
        self.axis: int | None = quantizer.ch_axis if scale.numel() > 1 else None
        self.scale = scale.detach().double()
        self.zero_point = zero_point.detach().round().long()  # a learned (LSQ) zero point is float

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return _decomposed.quantize_per_tensor(x, *self._tensor_args())
        return _decomposed.quantize_per_channel(x, self.scale, self.zero_point, self.axis, *self._range())

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return _decomposed.dequantize_per_tensor(q, *self._tensor_args())
        return _decomposed.dequantize_per_channel(q, self.scale, self.zero_point, self.axis, *self._range())

    def _range(self) -> tuple[int, int, torch.dtype]:
        return self.quant_min, self.quant_max, self.dtype

    def _tensor_args(self) -> tuple[float, int, int, int, torch.dtype]:
        # Python numbers, so that the export writes them as constants of the QDQ nodes.
        return float(self.scale), int(self.zero_point), *self._range()


class QuantDequant(nn.Module):
    """An activation's fake quantization, written as the quantize/dequantize pair ONNX fuses."""

    def __init__(self, quantizer: tq.FakeQuantizeBase | tq.ObserverBase) -> None:
        super().__init__()
        self.grid = _Grid(quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.dequantize(self.grid.quantize(x))


class QdqLinear(nn.Module):
    """A Linear with int8 weights stored as such, dequantized in the graph, and its output's QDQ pair if it has one."""

    def __init__(self, linear: nn.Linear, weight_quantizer: tq.FakeQuantizeBase | tq.ObserverBase) -> None:
        super().__init__()
        self.weight_grid = _Grid(weight_quantizer)
        self.register_buffer("weight", self.weight_grid.quantize(linear.weight.detach()))
        self.bias = linear.bias
        post_process = linear.activation_post_process  # nn.Identity with quant.linear_output=float
        quantized = isinstance(post_process, tq.FakeQuantizeBase | tq.ObserverBase)
        self.output = QuantDequant(post_process) if quantized else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(nn.functional.linear(x, self.weight_grid.dequantize(self.weight), self.bias))


class QdqEmbedding(nn.Module):
    """An embedding table stored int8 with one symmetric scale per row; rows are gathered, then scaled.

    Gathering int8 rows before dequantizing keeps the full table from being dequantized every call.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        weight = embedding.weight.detach()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scale[ids].unsqueeze(-1)


def to_qdq(prepared: nn.Module, embeddings_int8: bool) -> nn.Module:
    """A copy of a prepared (calibrated or QAT-trained) eager model in QDQ form, in eval mode."""
    model = copy.deepcopy(prepared).cpu().eval()
    _replace(model)
    if embeddings_int8:
        model.set_input_embeddings(QdqEmbedding(model.get_input_embeddings()))
    return model


def _replace(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nnqat.Linear):
            setattr(module, name, QdqLinear(child, child.weight_fake_quant))
        elif type(child) is nn.Linear and hasattr(child, "activation_post_process"):
            observer = child.qconfig.weight()  # static PTQ observes weights only at convert, as here
            observer(child.weight.detach())
            setattr(module, name, QdqLinear(child, observer))
        elif isinstance(child, nnqat.Embedding):
            continue  # QAT's fake-quantized table: to_qdq stores it as a QdqEmbedding
        elif isinstance(child, tq.FakeQuantizeBase | tq.ObserverBase):
            setattr(module, name, QuantDequant(child))
        else:
            _replace(child)
