"""Entry points: `qatflash` (train, test, time; also `python -m qatflash`) and `qatflash-bench` (time only),
two Hydra apps over the config groups in conf/."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qatflash.bench.app import bench
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


def _run_job(cfg: DictConfig, job: Callable[[Any, JobContext], dict[str, Any]]) -> dict[str, Any]:
    try:
        config = to_config(cfg)
        return job(config, job_context(cfg, config.experiment_name))
    except ConfigError as error:
        # Bad input: one line, no traceback, non-zero exit, before any training step or benchmark point.
        print(f"qatflash: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train(cfg: DictConfig) -> None:
    results = _run_job(cfg, run)
    metrics, latency = results["metrics"], (results["latency"] or [{}])[0]
    log.info(
        "test/acc=%.4f test/f1=%.4f latency p50=%s ms -> %s",
        metrics.get("test/acc", float("nan")),
        metrics.get("test/f1", float("nan")),
        f"{latency['p50_ms']:.2f}" if latency else "n/a",
        HydraConfig.get().runtime.output_dir,
    )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def benchmark(cfg: DictConfig) -> None:
    results = _run_job(cfg, bench)
    for row in results["latency"]:
        figures = (
            f"p50 {row['p50_ms']:.2f} ms (rsd {100 * row['rel_stdev']:.1f}%), peak {row['peak_memory_bytes'] / 2**20:.0f} MiB"
            if row["status"] == "ok"
            else f"failed: {row['error']}"
        )
        log.info(
            "%s L=%d B=%d %s: %s",
            row["attention"],
            row["seq_len"],
            row["batch_size"],
            row["backend"],
            figures,
        )


def main() -> None:
    register_schema()
    train()


def bench_main() -> None:
    register_schema()
    benchmark()


if __name__ == "__main__":
    main()
