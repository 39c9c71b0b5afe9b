"""Tasks: what a job learns from and is judged by, registered by name (`task=...`).

A task brings to every stage what is particular to it: its data module, model head and
LightningModule, its metrics (and which one is the headline figure, higher or lower better),
the inputs an exported or reloaded model is checked on, and the inputs its latency is timed on.
The stages, sweeps, resume, tracking and the report are the same for every task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatflash.registry import Registry

if TYPE_CHECKING:
    from qatflash.tasks.task import Task

TASKS: Registry[type[Task]] = Registry(
    "task.name",
    {
        "classification": "qatflash.tasks.classification:ClassificationTask",
        "causal_lm": "qatflash.tasks.causal_lm:CausalLMTask",
    },
    group="qatflash.tasks",
)
