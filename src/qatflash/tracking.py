"""Experiment tracking through Lightning's loggers: W&B (offline by default), CSV, or none.

Every job opens its own W&B run and finishes it, so a multirun logs every point, not only the first.
The run config holds the flat choices (model, data, quant, attention, seq length, batch, precision)
next to the full resolved config, so W&B's scatter and parallel-coordinates panels need no code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from qatflash.config import LoggerConfig


class Tracker:
    def __init__(
        self,
        cfg: LoggerConfig,
        folder: Path,
        name: str,
        group: str,
        job_type: str,
        config: dict[str, Any],
    ) -> None:
        self.cfg = cfg
        self.logger: Logger | None = None
        if cfg.kind == "wandb":
            self.logger = WandbLogger(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                group=group,
                job_type=job_type,
                tags=list(cfg.tags),
                mode=cfg.mode,
                save_dir=str(folder),
                config=config,
            )
            # Create the run now, so the config is in it even if the job fails before logging a metric.
            _ = self.logger.experiment
        elif cfg.kind == "csv":
            self.logger = CSVLogger(save_dir=str(folder), name="csv_logs", version="")
            self.logger.log_hyperparams(config)

    @property
    def lightning_logger(self) -> Logger | bool:
        return self.logger if self.logger is not None else False

    def summarize(self, values: dict[str, Any]) -> None:
        """Final figures of the job: the W&B run summary, or a last CSV row."""
        if isinstance(self.logger, WandbLogger):
            self.logger.experiment.summary.update(values)
        elif self.logger is not None:
            self.logger.log_metrics({k: v for k, v in values.items() if isinstance(v, int | float)})
            self.logger.save()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Close the run; a failed job's W&B run is marked failed (non-zero exit code)."""
        ok = exc_type is None
        if isinstance(self.logger, WandbLogger):
            self.logger.experiment.finish(exit_code=0 if ok else 1)
        elif self.logger is not None:
            self.logger.finalize("success" if ok else "failed")
