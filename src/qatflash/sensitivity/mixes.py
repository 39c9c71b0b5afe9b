"""From a sensitivity table to recipes: each group's options, the front, and one quant config per
budget, written where a sweep loads it (`quant=<name>` with the folder on `hydra.searchpath`).

A mix of one precision is that precision's own config with the chosen modules as its targets; a mix
of two is `quant.api=mixed` with one part per precision (`qatflash.quant.mixed`). Each config is
written whole (every field resolved), so it reproduces the precision it was measured with even if
the YAML it came from changes later.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from qatflash.config import QuantConfig, SearchConfig
from qatflash.results import atomic_path
from qatflash.sensitivity.groups import Group
from qatflash.sensitivity.search import Front, Mix, Option, best_within, smallest_within

FLOAT = "float"


def options(table: pd.DataFrame, groups: list[Group]) -> list[list[Option]]:
    """Per group (in `groups`' order): float at its float bytes and no harm, then each precision at
    its measured bytes and harm (a gain counts as none)."""
    by_group = {name: rows for name, rows in table.groupby("group", sort=False)}
    precisions = sorted(set(table["precision"]))
    for group in groups:
        measured = sorted(by_group[group.name]["precision"]) if group.name in by_group else []
        if measured != precisions:
            raise RuntimeError(
                f"the sensitivity table has {measured} for {group.name}, not each of {precisions}"
            )
    return [
        [
            Option(FLOAT, int(by_group[g.name]["float_bytes"].iloc[0]), 0.0),
            *(
                Option(row.precision, int(row.bytes), max(float(row.harm), 0.0))
                for row in by_group[g.name].itertuples()
            ),
        ]
        for g in groups
    ]


def budgets(search: SearchConfig, budget_key: str) -> list[tuple[str, float]]:
    """The search's budgets that apply to this task: its quality budget's values, then size ceilings."""
    quality = getattr(search, budget_key)
    return [*((budget_key, float(v)) for v in quality), *(("max_bytes", float(v)) for v in search.max_bytes)]


def chosen(front: Front, key: str, value: float) -> Mix | None:
    return best_within(front, int(value)) if key == "max_bytes" else smallest_within(front, value)


def mix_config(mix: Mix, groups: list[Group], precisions: dict[str, QuantConfig]) -> dict[str, Any] | None:
    """The quant config of `mix` (None when it keeps every group float)."""
    used = {
        name: [g for g, choice in zip(groups, mix.choices, strict=True) if choice == name]
        for name in precisions
    }
    parts = {name: _part(precisions[name], members) for name, members in used.items() if members}
    if not parts:
        return None
    if len(parts) == 1:
        return next(iter(parts.values()))
    method = next(iter(parts.values()))["method"]
    return {**asdict(QuantConfig()), "api": "mixed", "method": method, "parts": parts}


def _part(precision: QuantConfig, members: list[Group]) -> dict[str, Any]:
    config = asdict(precision)
    config["targets"] = {
        "include": [m for g in members for m in g.linears],
        "exclude": [],
        "skip_edge_blocks": False,
    }
    config["embeddings"] = "int8" if any(g.table for g in members) else "float"
    return config


def write_front(front: Front, groups: list[Group], path: Path) -> None:
    """Every mix of the front: its bytes, harm and choice per group."""
    rows = [
        {
            "bytes": mix.bytes,
            "harm": mix.harm,
            "choices": json.dumps(dict(zip([g.name for g in groups], mix.choices, strict=True))),
        }
        for mix in front.mixes
    ]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def write_mix(config: dict[str, Any], path: Path, header: str) -> None:
    """The quant config as YAML at `path` (quant/<name>.yaml), `header` as its comment."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    with atomic_path(path) as tmp:
        tmp.write_text(comment + OmegaConf.to_yaml(OmegaConf.create(config)))
