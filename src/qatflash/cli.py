"""Entry point: `qatflash` (and `python -m qatflash`), a Hydra app over the config groups in conf/."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qatflash.config import ConfigError, register_schema, to_config
from qatflash.pipeline import JobContext, run

log = logging.getLogger("qatflash")


def config_dir() -> str:
    """conf/ inside an installed wheel, else the repository's conf/ (editable install or checkout)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


def job_context(cfg: DictConfig, experiment_name: str) -> JobContext:
    hc = HydraConfig.get()
    group = experiment_name
    if hc.mode == RunMode.MULTIRUN:
        group = f"{experiment_name}/{Path(hc.sweep.dir).name}"
    return JobContext(
        folder=Path(hc.runtime.output_dir),
        choices={
            k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra")
        },
        overrides=list(hc.overrides.task),
        group=group,
        resolved_config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
    )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train(cfg: DictConfig) -> None:
    try:
        config = to_config(cfg)
        results = run(config, job_context(cfg, config.experiment_name))
    except ConfigError as error:
        # Bad input: one line, no traceback, non-zero exit, before any training step.
        print(f"qatflash: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics, latency = results["metrics"], (results["latency"] or [{}])[0]
    log.info(
        "test/acc=%.4f test/f1=%.4f latency p50=%s ms -> %s",
        metrics.get("test/acc", float("nan")),
        metrics.get("test/f1", float("nan")),
        f"{latency['p50_ms']:.2f}" if latency else "n/a",
        HydraConfig.get().runtime.output_dir,
    )


def main() -> None:
    register_schema()
    train()


if __name__ == "__main__":
    main()
