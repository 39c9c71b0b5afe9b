"""Which modules a recipe quantizes, chosen by glob patterns over their names, and what it covered.

Targeting is by name, not by type alone, so a sweep can compare "every Linear" with "FFN only" or
"keep the classifier in float" by changing YAML, and attention itself (an SDPA or flash kernel, not
a module) is never touched. Every recipe quantizes `nn.Linear`; GPT-2-family projections are
transformers' `Conv1D` (a Linear with its weight stored transposed), which targeting turns into
`nn.Linear` so that the same recipes quantize them. A module the patterns match that is neither
(a custom or subclassed projection) is refused rather than silently left float.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qatflash.config import TargetsConfig
from qatflash.errors import ConfigError

# The module types every recipe quantizes (Conv1D by way of `as_linear`).
PROJECTIONS = (nn.Linear, Conv1D)


def weight_matrices(model: nn.Module) -> dict[str, nn.Module]:
    """Every module holding its own weight matrix (a 2-D or larger `weight` parameter), by name:
    what a quantization recipe could store in fewer bits. Norms' 1-D scales are not among them."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(w := module._parameters.get("weight"), torch.Tensor) and w.dim() >= 2
    }


def included(name: str, targets: TargetsConfig) -> bool:
    return any(fnmatchcase(name, p) for p in targets.include)


def chosen(model: nn.Module, targets: TargetsConfig) -> list[str]:
    """The weight-matrix modules (embedding tables aside: `quant.embeddings` decides those) that
    the include patterns match and neither exclude nor skip_edge_blocks leave out."""
    tables = set(_embedding_tables(model))
    names = [
        name
        for name in weight_matrices(model)
        if name not in tables
        and included(name, targets)
        and not any(fnmatchcase(name, p) for p in targets.exclude)
    ]
    return _inner_blocks(names) if targets.skip_edge_blocks else names


def linear_targets(model: nn.Module, targets: TargetsConfig) -> list[str]:
    """The projections `targets` selects, refused in one line when the patterns match none or match
    a module no recipe can quantize; Conv1D targets are swapped for nn.Linear in place. No include
    pattern selects none (a recipe of the embedding table alone)."""
    if not targets.include:
        return []
    selected = chosen(model, targets)
    foreign = Counter(type(model.get_submodule(n)).__name__ for n in selected if not _projection(model, n))
    if foreign:
        raise ConfigError(
            f"quant.targets include={list(targets.include)} matches modules no recipe can quantize: "
            f"{dict(foreign)} (recipes quantize nn.Linear and transformers Conv1D); leave them out "
            "with quant.targets.exclude"
        )
    if not selected:
        linears = [n for n in weight_matrices(model) if _projection(model, n)]
        raise ConfigError(
            f"quant.targets include={list(targets.include)} exclude={list(targets.exclude)} "
            f"skip_edge_blocks={targets.skip_edge_blocks} match no nn.Linear; "
            f"this model's Linear layers are named like {linears[:3]}"
        )
    for name in selected:
        module = model.get_submodule(name)
        if isinstance(module, Conv1D):
            replace_module(model, name, as_linear(module))
    return selected


def _projection(model: nn.Module, name: str) -> bool:
    return type(model.get_submodule(name)) in PROJECTIONS


def as_linear(conv: Conv1D) -> nn.Linear:
    """The nn.Linear computing what `conv` computes (x W + b, W of shape (in, out)): weight transposed,
    on its device and dtype, trainable as it was."""
    weight = conv.weight
    linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    linear.weight.requires_grad_(weight.requires_grad)
    linear.train(conv.training)
    return linear


# A transformer block's index in a module name: BERT's layer.N, Llama's layers.N, GPT-2's h.N.
_BLOCK = re.compile(r"\.(?:layers?|h)\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The index of the transformer block module `name` sits in (None: outside every block)."""
    found = _BLOCK.search(f".{name}")
    return int(found.group(1)) if found else None


def kind_of(name: str) -> str:
    """`name` with its block index as `*`: the same projection in every block (encoder.layer.*.attention.self.query)."""
    return _BLOCK.sub(lambda m: m.group(0).replace(m.group(1), "*"), f".{name}", count=1)[1:]


def _inner_blocks(names: list[str]) -> list[str]:
    """`names` without those in the lowest- and highest-numbered transformer block."""
    blocks = {name: block for name in names if (block := block_of(name)) is not None}
    edges = {min(blocks.values()), max(blocks.values())} if blocks else set()
    return [name for name in names if blocks.get(name) not in edges]


def _embedding_tables(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Embedding)]


def embedding_targets(model: nn.Module) -> list[str]:
    """The token-embedding table (transformers' get_input_embeddings): most of a small model's bytes.

    Position and token-type tables are tiny, and BERT feeds them expanded (non-contiguous) ids that
    the quantized embedding kernel refuses, so they stay float.
    """
    table = model.get_input_embeddings()
    return [
        name for name, module in model.named_modules() if module is table and type(module) is nn.Embedding
    ]


def coverage(model: nn.Module, targets: TargetsConfig, quantized: Iterable[str]) -> dict[str, Any]:
    """What a recipe quantized of the float `model`, per module type: its weight-matrix modules and
    their weight elements, how many of each were `quantized`, and how many the include patterns
    matched but were left float (by exclude, skip_edge_blocks, or quant.embeddings=float); and the
    share of all weight elements quantized. A tied table counts once per module that uses it:
    each is stored quantized on its own."""
    done = set(quantized)
    per_type: dict[str, dict[str, int]] = {}
    for name, module in weight_matrices(model).items():
        row = per_type.setdefault(
            type(module).__name__,
            {"modules": 0, "weights": 0, "quantized_modules": 0, "quantized_weights": 0, "matched_float": 0},
        )
        size = module.weight.numel()
        row["modules"] += 1
        row["weights"] += size
        if name in done:
            row["quantized_modules"] += 1
            row["quantized_weights"] += size
        elif included(name, targets):
            row["matched_float"] += 1
    total = sum(row["weights"] for row in per_type.values())
    share = sum(row["quantized_weights"] for row in per_type.values()) / total if total else 0.0
    return {"by_type": per_type, "quantized_weight_share": round(share, 4)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
