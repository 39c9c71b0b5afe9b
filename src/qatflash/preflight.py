"""A command's config-level checks without running it: every point it would launch, composed as
Hydra composes it, then every refusal of its app that needs no data, no model weights and no device.

What a documented command promises (a preset's comment, README, the GPU check) is only true while
it composes and passes those checks; a GPU command is written on machines without one. So this runs
each point of `qatflash ...` or `qatflash-bench ...` through:
- the schema (types, ranges, vocabularies) and each recipe's own config check (`to_config`);
- `qatflash`: `pipeline.preflight` (device, SLURM tasks, lengths against the model's positions,
  attention against device and precision, timing backends, the recipe on the CPU, the task's
  timing checks, the QAT schedule's form);
- `qatflash-bench`: `bench.app.check_bench` (the same for a benchmark, the recipe on `bench.device`),
  then `bench.max_memory_gb` set as the points set it, on the indexed device;
leaving out only what needs the device itself: a forced SDPA kernel is not tried (`probe_kernel`).
The caller provides the CUDA a GPU point needs (`needs_cuda`): real, or a fake of its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict

from qatflash.cli import config_dir
from qatflash.config import BenchAppConfig, Config, register_schema, to_config

# The entry points and the config each composes.
APPS = {"qatflash": "config", "qatflash-bench": "bench"}
_MULTIRUN = ("-m", "--multirun")


@dataclass(frozen=True)
class Point:
    """One job a command launches: its app and the overrides Hydra composes it from."""

    app: str
    overrides: tuple[str, ...]

    @cached_property
    def config(self) -> DictConfig:
        """Composed once: a point's checks and whether it needs CUDA read the same config."""
        return compose_config(APPS[self.app], list(self.overrides))


def points(app: str, args: list[str]) -> list[Point]:
    """The jobs `app args` launches: one, or for a multirun every combination of its sweep, the
    preset's `hydra.sweeper.params` first and the command line's values winning, as Hydra's basic
    sweeper expands them."""
    if app not in APPS:
        raise ValueError(f"{app} is not one of {sorted(APPS)}")
    overrides = [a for a in args if a not in _MULTIRUN]
    if len(overrides) == len(args):
        return [Point(app, tuple(overrides))]
    parser = OverridesParser.create()
    fixed = [str(o.input_line) for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    swept = compose_config(APPS[app], fixed, with_hydra=True).hydra.sweeper.params or {}
    lines = [f"{key}={value}" for key, value in swept.items()] + overrides
    (combinations,) = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
    return [Point(app, tuple(combination)) for combination in combinations]


def needs_cuda(point: Point) -> bool:
    """Whether the point runs on a CUDA device (trainer.accelerator=gpu/cuda, bench.device=cuda)."""
    cfg = point.config
    device = cfg.bench.device if point.app == "qatflash-bench" else cfg.trainer.accelerator
    return device in ("gpu", "cuda")


def check(point: Point) -> None:
    """Every refusal of the point's app that needs no data, weights or device (ConfigError if refused)."""
    config = to_config(point.config)
    if isinstance(config, BenchAppConfig):
        _check_bench(config)
    else:
        _check_training(config)


def _check_training(cfg: Config) -> None:
    from qatflash.pipeline import preflight
    from qatflash.tasks import TASKS

    preflight(cfg, TASKS.load(cfg.task.name)(cfg), probe_kernel=False)


def _check_bench(cfg: BenchAppConfig) -> None:
    from qatflash.bench.app import check_bench
    from qatflash.bench.points import cap_memory
    from qatflash.job import resolve_device

    check_bench(cfg, probe_kernel=False)
    device = resolve_device("bench.device", cfg.bench.device)
    if device.type == "cuda":  # on the CPU the cap is an address-space limit of this very process
        cap_memory(cfg.bench.max_memory_gb, device)


def compose_config(config_name: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The DictConfig the app of `config_name` (config: qatflash, bench: qatflash-bench) runs with
    `overrides`; Hydra's own node only `with_hydra` (a multirun's sweep is read from it)."""
    register_schema()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
    if not with_hydra:
        with open_dict(cfg):
            cfg.pop("hydra", None)
    return cfg
