"""Which layers to quantize: per-group sensitivity with its uncertainty, and a mixed-precision search.

A stage of a float job (`sensitivity:` in the config, `quant=fp32`), not an app of its own: it needs
what a training point has — the fine-tuned float model (or the sweep's shared one), the task's data
and statistic, resume, tracking, and Hydra's sweep over `data.max_length` — and the float point it
runs in is the reference its mixes are later compared with. `measure` scores every group quantized
alone; the search (`search`, `mixes`) turns the table into the front of size against quality lost
and one quant config per budget, written under the sweep's `mixes/quant/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatflash.config import BUDGETS, Config, QuantConfig
from qatflash.report.quality import STATISTICS
from qatflash.report.stats import spearman
from qatflash.results import FRONT_FILE, SENSITIVITY_FILE
from qatflash.sensitivity.groups import Group
from qatflash.sensitivity.measure import Subject, measure
from qatflash.sensitivity.mixes import FLOAT, budgets, chosen, mix_config, options, write_front, write_mix
from qatflash.sensitivity.search import Front, search_front

# How a mix's file name abbreviates its budget.
_SHORT = {"max_acc_drop": "acc", "max_ppl_increase": "ppl", "max_bytes": "bytes"}


def mix_name(prefix: str, key: str, value: float) -> str:
    """quant/<name>.yaml of the mix a budget chose: the point's prefix, then the budget (…_acc0p5,
    …_bytes12000000)."""
    amount = f"{int(value)}" if key == "max_bytes" else f"{value:g}".replace(".", "p")
    return f"{prefix}_{_SHORT[key]}{amount}"


@dataclass(frozen=True)
class _Chosen:
    """Where a search's mixes go and what they are made of: the front, its groups, the precisions,
    the statistic's unit, the mixes folder and the point's name prefix, and where they came from."""

    front: Front
    groups: list[Group]
    precisions: dict[str, QuantConfig]
    unit: str
    folder: Path
    prefix: str
    source: str

    def write(self, key: str, value: float) -> dict[str, Any]:
        """The mix `key` = `value` picks from the front, written as a quant config (none when it
        keeps every group float: that is fp32), and what results.json says of it."""
        entry: dict[str, Any] = {"budget": key, "value": value}
        mix = chosen(self.front, key, value)
        if mix is None:
            return {**entry, "quant": None, "why": "no mix of the front fits"}
        config = mix_config(mix, self.groups, self.precisions)
        name = mix_name(self.prefix, key, value) if config is not None else "fp32"
        if config is not None:
            header = (
                f"Chosen by qatflash's sensitivity search ({self.source}):\n"
                f"{key} = {value:g}; predicted on the validation examples: {mix.harm:.4g} {self.unit} "
                f"lost, {mix.bytes} bytes of quantizable weights.\n"
                f"Load it with hydra.searchpath=[file://{self.folder.resolve()}] quant={name}"
            )
            write_mix(config, self.folder / "quant" / f"{name}.yaml", header)
        kept = [g.name for g, choice in zip(self.groups, mix.choices, strict=True) if choice == FLOAT]
        return {
            **entry,
            "quant": name,
            "bytes": mix.bytes,
            "harm": mix.harm,
            "groups_quantized": len(self.groups) - len(kept),
            "kept_float": kept,
        }


def run(
    cfg: Config, subject: Subject, folder: Path, mixes: Path, prefix: str, resume: bool
) -> dict[str, Any]:
    """Measure, search, and write the mixes under `mixes`, named from `prefix` (which tells the
    points of a sweep apart); returns results.json's sensitivity section."""
    assert cfg.sensitivity is not None, "the pipeline runs this stage only with a sensitivity section"
    started = time.perf_counter()
    sensitivity = cfg.sensitivity
    groups, table = measure(sensitivity, subject, folder, resume)
    statistic = STATISTICS[subject.task.quality]
    rank = spearman(table["kl"].to_numpy(), table["harm"].to_numpy())
    front = search_front(options(table, groups), sensitivity.search.exact_front_limit)
    write_front(front, groups, folder / FRONT_FILE)
    source = f"{front.method} front of {folder}"
    writer = _Chosen(front, groups, sensitivity.precisions, statistic.unit, mixes, prefix, source)
    written = [writer.write(*budget) for budget in budgets(sensitivity.search, BUDGETS[statistic.name])]
    return {
        "groups": sensitivity.groups,
        "group_count": len(groups),
        "precisions": list(sensitivity.precisions),
        "statistic": statistic.name,
        "unit": statistic.unit,
        "examples": int(table["examples"].max()),
        "file": SENSITIVITY_FILE,
        "proxy": "kl",
        "proxy_spearman": {"rho": rank.estimate, "low": rank.low, "high": rank.high},
        "search": front.method,
        "front_file": FRONT_FILE,
        "front_mixes": len(front.mixes),
        "mixes_dir": str(mixes),
        "mixes": written,
        "seconds": round(time.perf_counter() - started, 3),
    }
