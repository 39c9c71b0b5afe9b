"""Which modules a recipe quantizes, chosen by glob patterns over their names.

Targeting is by name, not by type alone, so a sweep can compare "every Linear" with "FFN only" or
"keep the classifier in float" by changing YAML, and attention itself (an SDPA or flash kernel, not
a module) is never touched.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from torch import nn

from qatflash.config import TargetsConfig
from qatflash.errors import ConfigError


def linear_targets(model: nn.Module, targets: TargetsConfig) -> list[str]:
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    chosen = [
        name
        for name in names
        if any(fnmatchcase(name, p) for p in targets.include)
        and not any(fnmatchcase(name, p) for p in targets.exclude)
    ]
    if targets.skip_edge_blocks:
        chosen = _inner_blocks(chosen)
    if not chosen:
        raise ConfigError(
            f"quant.targets include={list(targets.include)} exclude={list(targets.exclude)} "
            f"skip_edge_blocks={targets.skip_edge_blocks} match no nn.Linear; "
            f"this model's Linear layers are named like {names[:3]}"
        )
    return chosen


_BLOCK = re.compile(r"\.layers?\.(\d+)\.")


def _inner_blocks(names: list[str]) -> list[str]:
    """`names` without those in the lowest- and highest-numbered transformer block."""
    blocks = {name: int(m.group(1)) for name in names if (m := _BLOCK.search(f".{name}"))}
    edges = {min(blocks.values()), max(blocks.values())} if blocks else set()
    return [name for name in names if blocks.get(name) not in edges]


def embedding_targets(model: nn.Module) -> list[str]:
    """The token-embedding table (transformers' get_input_embeddings): most of a small model's bytes.

    Position and token-type tables are tiny, and BERT feeds them expanded (non-contiguous) ids that
    the quantized embedding kernel refuses, so they stay float.
    """
    table = model.get_input_embeddings()
    return [
        name for name, module in model.named_modules() if module is table and type(module) is nn.Embedding
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
