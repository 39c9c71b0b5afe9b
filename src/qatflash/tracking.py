"""Experiment tracking through Lightning's loggers: W&B (offline by default), CSV, or none.

Tracking never costs a job its results: if W&B fails to start, the job logs to CSV in its folder
and says so (in the log and in results.json's `warnings`); a failing summary or finish only warns.
Every job opens its own W&B run and finishes it, so a multirun logs every point, not only the first.
The run config holds the flat choices (model, data, quant, attention, seq length, batch, precision)
next to the full resolved config, so W&B's scatter and parallel-coordinates panels need no code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from qatflash.config import LoggerConfig

log = logging.getLogger("qatflash")
CSV_FOLDER = "csv_logs"


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
        self.folder = folder
        self.logger: Logger | None = None
        # What went wrong with tracking; the job goes on and records these in results.json.
        self.warnings: list[str] = []
        if cfg.kind == "wandb":
            try:
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
            except Exception as error:  # W&B down, no API key, a full disk: the job must not die of it
                self._warn("W&B failed to start", error, f"metrics go to {folder / CSV_FOLDER} instead")
                self.logger = self._csv(config)
        elif cfg.kind == "csv":
            self.logger = self._csv(config)

    def _csv(self, config: dict[str, Any]) -> CSVLogger:
        logger = CSVLogger(save_dir=str(self.folder), name=CSV_FOLDER, version="")
        logger.log_hyperparams(config)
        return logger

    def _warn(self, what: str, error: BaseException, consequence: str) -> None:
        message = f"{what} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); {consequence}"
        log.warning(message)
        self.warnings.append(message)

    def summarize(self, values: dict[str, Any]) -> None:
        """Final figures of the job: the W&B run summary, or a last CSV row."""
        if isinstance(self.logger, WandbLogger):
            try:
                self.logger.experiment.summary.update(values)
            except Exception as error:
                self._warn("W&B summary failed", error, "results.json holds every figure")
        elif self.logger is not None:
            self.logger.log_metrics({k: v for k, v in values.items() if isinstance(v, int | float)})
            self.logger.save()

    def table(self, key: str, path: Path) -> None:
        """A CSV the job wrote (a sensitivity table, a front) as a W&B table; other loggers keep it
        where it is, in the job's folder."""
        if not isinstance(self.logger, WandbLogger):
            return
        import pandas as pd

        try:
            self.logger.log_table(key=key, dataframe=pd.read_csv(path))
        except Exception as error:
            self._warn(f"W&B table {key} failed", error, f"{path} holds it")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Close the run; a failed job's W&B run is marked failed (non-zero exit code)."""
        ok = exc_type is None
        if isinstance(self.logger, WandbLogger):
            try:
                self.logger.experiment.finish(exit_code=0 if ok else 1)
            except Exception as error:
                self._warn(
                    "W&B finish failed",
                    error,
                    f"the offline run under {self.folder / 'wandb'} may be incomplete",
                )
        elif self.logger is not None:
            self.logger.finalize("success" if ok else "failed")
