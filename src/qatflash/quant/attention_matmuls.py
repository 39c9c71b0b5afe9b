"""Fake quantization of the attention matmuls' inputs (QKᵀ and probabilities·V), for eager attention.

Transformers dispatches attention through `AttentionInterface`; registering `qat_eager` (eager
attention with fake-quantized operands) lets any model whose attention modules go through that
interface train with 8-bit attention arithmetic, without touching its code. The four FakeQuantize
modules live on each attention module, so they are in the state_dict (checkpoints, artifacts) and
follow the QAT callback's fake-quant/observer schedule like every other one. Eager torch.ao has
no INT8 batched-matmul kernel, so the converted model keeps simulating these matmuls in float.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

IMPLEMENTATION = "qat_eager"
_OPERANDS = ("query", "key", "probs", "value")


def _fake_quantized_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    quantize = module.attention_fake_quant
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(quantize["query"](query), quantize["key"](key).transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(quantize["probs"](probs), quantize["value"](value))
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(IMPLEMENTATION, _fake_quantized_attention)


def add_attention_fake_quant(model: nn.Module, fake_quantize: Any) -> int:
    """Give every attention module (one with a `scaling` attribute) its operands' fake quantizers and
    switch the model to `qat_eager`; returns how many attention modules were found."""
    modules = [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "config")]
    for module in modules:
        module.attention_fake_quant = nn.ModuleDict({name: fake_quantize() for name in _OPERANDS})
    model.set_attn_implementation(IMPLEMENTATION)
    return len(modules)


@contextlib.contextmanager
def set_aside(model: nn.Module) -> Iterator[None]:
    """Detach the attention fake quantizers for the enclosed torch.ao convert, then put them back.

    convert strips every `activation_post_process` it finds, including the observers inside these
    FakeQuantize modules, which have no INT8 module to become and must keep simulating.
    """
    owners = [
        m for m in model.modules() if isinstance(getattr(m, "attention_fake_quant", None), nn.ModuleDict)
    ]
    kept = [owner._modules.pop("attention_fake_quant") for owner in owners]
    try:
        yield
    finally:
        for owner, quantizers in zip(owners, kept, strict=True):
            owner.attention_fake_quant = quantizers
