"""Entry points: `qatflash` (train, test, time; also `python -m qatflash`), `qatflash-bench` (time only)
and `qatflash-report`. Only Hydra and the schemas load at start-up: torch, transformers and the job
code are imported when a job runs, so `--help` and the report start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qatflash.config import register_schema, to_config
from qatflash.errors import ConfigError, first_line

log = logging.getLogger("qatflash")
# Libraries that speak at import or start-up about things a run does not use: torchao (which
# transformers imports wherever it is installed) about CUDA extension libraries it cannot load,
# torch about its pytree registrations, Lightning about accelerators it found and its tips,
# bitsandbytes (which peft imports, and transformers imports peft, wherever they are installed)
# about an optional kernel package its CPU backend does without.
_QUIET = (
    "torchao",
    "torch.utils._pytree",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric",
    "bitsandbytes",
)


def config_dir() -> str:
    """conf/ inside an installed wheel, else the repository's conf/ (editable install or checkout)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


def _run_job(cfg: DictConfig, job: Callable[[Any, Any], dict[str, Any]]) -> dict[str, Any]:
    """One job, or one point of a sweep: skipped when already ok, recorded whatever happens.

    In a sweep a failed point raises an ordinary exception after recording it, which Hydra's
    launchers catch per job: the other points run, and the command exits non-zero at the end.
    A single run refuses bad input with one line and exit code 2.
    """
    from qatflash.job import job_context
    from qatflash.results import RunRecord, read_results
    from qatflash.slurm import sigterm_interrupts

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
            with RunRecord(
                context.folder, context.choices, {"overrides": context.overrides}, context.config_hash
            ):
                raise
        with sigterm_interrupts():
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
            log.error("point failed: %s (%s)", first_line(error, with_type=False), context.folder)
        raise


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def train_app(cfg: DictConfig) -> float | tuple[float, ...] | None:
    from qatflash.job import process_rank
    from qatflash.pipeline import run

    results = _run_job(cfg, run)
    if process_rank() != 0:  # a task of a multi-task DDP job: rank 0 records, reports and returns
        return None
    headline = (results.get("task") or {}).get("headline", "test/acc")
    latency = (results["latency"] or [{}])[0]  # the reference row: FP32 on the job's first backend
    what = "decode p50 per token" if latency.get("scenario") == "generate" else "latency p50"
    log.info(
        "%s=%.4f %s %s=%s ms -> %s",
        headline,
        results["metrics"].get(headline, float("nan")),
        "/".join((latency.get("variant", "-"), latency.get("backend", "-"))),
        what,
        f"{latency['p50_ms']:.2f}" if latency else "n/a",
        HydraConfig.get().runtime.output_dir,
    )
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return objective(results, list(cfg.objective) if cfg.objective is not None else [headline])


def objective(results: dict[str, Any], keys: list[str]) -> float | tuple[float, ...]:
    """The figures an optimising sweeper (hydra/sweeper=optuna) maximises or minimises; NaN for a
    QAT job whose quantized model was not shipped (its target's kernels are absent here), which has
    no shipped figures: the sweep goes on, and no sweeper reads a float figure as the shipped one."""
    from qatflash.results import summary_figures

    figures = summary_figures(results)
    missing = [k for k in keys if not isinstance(figures.get(k), int | float)]
    if missing and (results.get("model") or {}).get("not_shipped"):
        figures = {**figures, **dict.fromkeys(missing, float("nan"))}
    elif missing:
        numeric = sorted(k for k, v in figures.items() if isinstance(v, int | float))
        raise ConfigError(f"objective={keys}: {missing} are not figures of this job; it has {numeric}")
    values = tuple(float(figures[k]) for k in keys)
    return values[0] if len(values) == 1 else values


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def bench_app(cfg: DictConfig) -> None:
    from qatflash.bench.app import run_benchmark

    results = _run_job(cfg, run_benchmark)
    for row in results["latency"]:
        log.info("%s", _bench_line(row))


def _bench_line(row: dict[str, Any]) -> str:
    """One benchmark row as the log shows it: the point, the model, its headline figures."""
    point = f"{row['attention']} L={row['seq_len']} B={row['batch_size']} {row['backend']} {row['quant']}"
    if row["status"] != "ok":
        return f"{point}: failed: {row['error']}"
    figures = f"p50 {row['p50_ms']:.2f} ms (rsd {100 * row['rel_stdev']:.1f}%)"
    if row["scenario"] == "generate":
        figures = f"prefill p50 {row['prefill_p50_ms']:.1f} ms, decode {figures} per token"
    ratio = f", {row['ratio_to_float']:.2f}x float" if "ratio_to_float" in row else ""
    return f"{point} {row['variant']}: {figures}{ratio}, peak {row['peak_memory_bytes'] / 2**20:.0f} MiB"


def report_main(argv: list[str] | None = None) -> None:
    """`qatflash-report <sweep dir>...`: tables and plots from the results.json files under the folders."""
    parser = argparse.ArgumentParser(prog="qatflash-report", description=report_main.__doc__)
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep (or run) folders, searched recursively")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the first folder)")
    parser.add_argument(
        "--margin",
        type=float,
        help="non-inferiority margin of accuracy verdicts, in accuracy points (default 1)",
    )
    parser.add_argument(
        "--ppl-margin",
        type=float,
        help="non-inferiority margin of perplexity verdicts, in percent of the reference's (default 2)",
    )
    parser.add_argument(
        "--f1-margin",
        type=float,
        help="non-inferiority margin of macro-F1 verdicts, in F1 points (default 1)",
    )
    parser.add_argument("--wandb", action="store_true", help="also log the tables and Pareto plot to W&B")
    parser.add_argument("--wandb-project", default="qatflash")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.sweeps if not p.exists()]
    if missing:
        parser.exit(2, f"qatflash-report: error: {missing} do not exist\n")
    from qatflash.report import log_to_wandb, write_report
    from qatflash.report.quality import Margins

    given = {"accuracy": args.margin, "ppl": args.ppl_margin, "macro_f1": args.f1_margin}
    margins = Margins(**{figure: margin for figure, margin in given.items() if margin is not None})
    report = write_report(args.sweeps, args.out or args.sweeps[0], margins)
    if report.points == 0:
        parser.exit(
            2, f"qatflash-report: error: no usable results.json under {[str(p) for p in args.sweeps]}\n"
        )
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{report.points} point(s) -> " + ", ".join(str(f) for f in report.files))
    if args.wandb:
        print(f"W&B summary run: {log_to_wandb(report, args.wandb_project, args.wandb_mode)}")


def _start(app: Callable[[], Any]) -> None:
    """Register the schemas, name sweep points by what they vary, quiet the libraries, run `app`."""
    from qatflash.job import folder_name_exclusions

    register_schema()
    # Progress bars of datasets' loading and casting: noise in a job's log, and before a refusal.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Lightning, on any machine with SLURM's client installed, about a job not started by srun: a
    # job outside SLURM is not meant to be (under SLURM, submitit starts every task with srun).
    warnings.filterwarnings(
        "ignore", message="The `srun` command is available on your system but is not used"
    )
    exclusions = folder_name_exclusions(sys.argv[1:])
    if exclusions is not None:
        sys.argv.append(exclusions)
    app()


def main() -> None:
    _start(train_app)


def bench_main() -> None:
    _start(bench_app)


if __name__ == "__main__":
    main()
