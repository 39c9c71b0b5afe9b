"""Entry points: `qatflash` (train, test, time; also `python -m qatflash`) and `qatflash-bench` (time only),
two Hydra apps over the config groups in conf/."""

from __future__ import annotations

import argparse
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
from qatflash.report import log_to_wandb, write_report
from qatflash.results import RunRecord, read_results, summary_figures

log = logging.getLogger("qatflash")


def config_dir() -> str:
    """conf/ inside an installed wheel, else the repository's conf/ (editable install or checkout)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


def job_context(cfg: DictConfig) -> JobContext:
    hc = HydraConfig.get()
    group = cfg.experiment_name
    if hc.mode == RunMode.MULTIRUN:
        group = f"{cfg.experiment_name}/{Path(hc.sweep.dir).name}"
    return JobContext(
        folder=Path(hc.runtime.output_dir),
        choices={
            k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra")
        },
        overrides=list(hc.overrides.task),
        group=group,
        resolved_config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        sweep_dir=Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None,
    )


def _run_job(cfg: DictConfig, job: Callable[[Any, JobContext], dict[str, Any]]) -> dict[str, Any]:
    """One job, or one point of a sweep: skipped when already ok, recorded whatever happens.

    In a sweep a failed point raises an ordinary exception after recording it, which Hydra's
    launchers catch per job: the other points run, and the command exits non-zero at the end.
    A single run refuses bad input with one line and exit code 2.
    """
    context = job_context(cfg)
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    done = read_results(context.folder)
    if sweeping and not cfg.force and done and done.get("status") == "ok":
        if done.get("config_hash") == context.config_hash:
            log.info("already ok, skipped (force=true re-runs it): %s", context.folder)
            return done
        log.info("config changed since the recorded ok run; running again: %s", context.folder)
    try:
        try:
            config = to_config(cfg)
        except ConfigError:
            params = {"overrides": context.overrides}
            with RunRecord(context.folder, context.choices, params, context.config_hash):
                raise
        return job(config, context)
    except ConfigError as error:
        if sweeping:
            log.error("point refused: %s (%s)", error, context.folder)
            raise
        # Bad input: one line, no traceback, non-zero exit, before any training step or benchmark point.
        print(f"qatflash: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        if sweeping:
            log.error(
                "point failed: %s (%s)", str(error).splitlines()[0] if str(error) else error, context.folder
            )
        raise


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train(cfg: DictConfig) -> float | tuple[float, ...] | None:
    results = _run_job(cfg, run)
    metrics, latency = results["metrics"], (results["latency"] or [{}])[0]
    log.info(
        "test/acc=%.4f test/f1=%.4f latency p50=%s ms -> %s",
        metrics.get("test/acc", float("nan")),
        metrics.get("test/f1", float("nan")),
        f"{latency['p50_ms']:.2f}" if latency else "n/a",
        HydraConfig.get().runtime.output_dir,
    )
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return objective(results, list(cfg.objective))


def objective(results: dict[str, Any], keys: list[str]) -> float | tuple[float, ...]:
    """The figures an optimising sweeper (hydra/sweeper=optuna) maximises or minimises."""
    figures = summary_figures(results)
    missing = [k for k in keys if not isinstance(figures.get(k), int | float)]
    if missing:
        numeric = sorted(k for k, v in figures.items() if isinstance(v, int | float))
        raise ConfigError(f"objective={keys}: {missing} are not figures of this job; it has {numeric}")
    values = tuple(float(figures[k]) for k in keys)
    return values[0] if len(values) == 1 else values


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


def report_main(argv: list[str] | None = None) -> None:
    """`qatflash-report <sweep dir>...`: tables and plots from the results.json files under the folders."""
    parser = argparse.ArgumentParser(prog="qatflash-report", description=report_main.__doc__)
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep (or run) folders, searched recursively")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first folder)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and Pareto plot to W&B")
    parser.add_argument("--wandb-project", default="qatflash")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.sweeps if not p.exists()]
    if missing:
        parser.exit(2, f"qatflash-report: error: {missing} do not exist\n")
    report = write_report(args.sweeps, args.out or args.sweeps[0])
    if report.points == 0:
        parser.exit(
            2, f"qatflash-report: error: no usable results.json under {[str(p) for p in args.sweeps]}\n"
        )
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{report.points} point(s) -> " + ", ".join(str(f) for f in report.files))
    if args.wandb:
        print(f"W&B summary run: {log_to_wandb(report, args.wandb_project, args.wandb_mode)}")


def main() -> None:
    register_schema()
    train()


def bench_main() -> None:
    register_schema()
    benchmark()


if __name__ == "__main__":
    main()
