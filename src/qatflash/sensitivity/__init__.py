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
from pathlib import Path
from typing import Any

from qatflash.config import BUDGETS, Config
from qatflash.report.quality import STATISTICS
from qatflash.report.stats import spearman
from qatflash.results import FRONT_FILE, SENSITIVITY_FILE
from qatflash.sensitivity.measure import Subject, measure
from qatflash.sensitivity.mixes import FLOAT, budgets, chosen, mix_config, options, write_front, write_mix
from qatflash.sensitivity.search import search_front

# How a mix's file name abbreviates its budget.
_SHORT = {"max_acc_drop": "acc", "max_ppl_increase": "ppl", "max_bytes": "bytes"}


def mix_name(prefix: str, key: str, value: float) -> str:
    """quant/<name>.yaml of the mix a budget chose: the point's prefix, then the budget (…_acc0p5,
    …_bytes12000000)."""
    amount = f"{int(value)}" if key == "max_bytes" else f"{value:g}".replace(".", "p")
    return f"{prefix}_{_SHORT[key]}{amount}"


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
    chosen_mixes = []
    for key, value in budgets(sensitivity.search, BUDGETS[subject.task.quality]):
        mix = chosen(front, key, value)
        entry: dict[str, Any] = {"budget": key, "value": value}
        if mix is None:
            chosen_mixes.append({**entry, "quant": None, "why": "no mix of the front fits"})
            continue
        config = mix_config(mix, groups, sensitivity.precisions)
        name = mix_name(prefix, key, value) if config is not None else "fp32"
        if config is not None:
            header = (
                f"Chosen by qatflash's sensitivity search ({front.method} front) from {folder}:\n"
                f"{key} = {value:g}; predicted on the validation examples: {mix.harm:.4g} {statistic.unit} lost, "
                f"{mix.bytes} bytes of quantizable weights.\n"
                f"Load it with hydra.searchpath=[file://{mixes.resolve()}] quant={name}"
            )
            write_mix(config, mixes / "quant" / f"{name}.yaml", header)
        kept = [group.name for group, choice in zip(groups, mix.choices, strict=True) if choice == FLOAT]
        chosen_mixes.append(
            {
                **entry,
                "quant": name,
                "bytes": mix.bytes,
                "harm": mix.harm,
                "groups_quantized": len(groups) - len(kept),
                "kept_float": kept,
            }
        )
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
        "mixes": chosen_mixes,
        "seconds": round(time.perf_counter() - started, 3),
    }
