"""The module groups a sensitivity analysis quantizes one at a time (`sensitivity.groups`).

A group is what a mixed-precision recipe can keep apart: `linear` makes each targeted projection
its own (a fused one, GPT-2's c_attn, stays one module and so one group); `block` gathers each
transformer block's projections; `kind` gathers one projection across the blocks (every block's
query, every block's down projection). Modules outside the blocks (an LM head, a pooler) are groups
of their own under `block` and `kind`, and so is the token-embedding table where the precision
quantizes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatflash.quant.targeting import block_of, kind_of


@dataclass(frozen=True)
class Group:
    """A group's name (a module's, `block.N`, or a kind's pattern), its Linear modules, and the
    embedding table it holds, if any (one group holds it alone)."""

    name: str
    linears: tuple[str, ...] = ()
    table: str | None = None

    @property
    def modules(self) -> tuple[str, ...]:
        return (*self.linears, *([self.table] if self.table else []))


def module_groups(linears: list[str], tables: list[str], by: str) -> list[Group]:
    """The groups of `linears` (in model order) by `by` (linear, block, kind), then each table."""
    keys = {"linear": lambda name: name, "block": _block_key, "kind": kind_of}
    grouped: dict[str, list[str]] = {}
    for name in linears:
        grouped.setdefault(keys[by](name), []).append(name)
    return [
        *(Group(key, tuple(members)) for key, members in grouped.items()),
        *(Group(table, table=table) for table in tables),
    ]


def _block_key(name: str) -> str:
    block = block_of(name)
    return name if block is None else f"block.{block}"
