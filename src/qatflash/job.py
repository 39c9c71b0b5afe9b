"""The envelope of one Hydra job, the same for `qatflash` and `qatflash-bench`: where it writes and
what it is called, its device, its record and tracker, and the policy for resuming and checkpoints.

A sweep point's folder is named by the keys the sweep varies, so points tell apart at a glance and
the same command lands in the same folders (that is what lets a re-run resume). Under a launch of
several processes (torchrun, srun) only rank 0 writes the record and the tracker's run. Heavy
imports (torch, lightning, the tracker) wait until a job runs: `qatflash --help` loads none of them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatflash import slurm
from qatflash.errors import ConfigError
from qatflash.results import RESULTS_FILE, RunRecord, read_results

if TYPE_CHECKING:
    import lightning as L
    import torch
    from omegaconf import DictConfig

    from qatflash.config import LoggerConfig
    from qatflash.tracking import Tracker

log = logging.getLogger("qatflash")

# Where results go, whether a finished point is redone or its training shared, what a sweeper reads:
# none of them changes a figure.
NOT_RESULT_KEYS = ("logger", "force", "sweep_name", "reuse_fp32", "keep_checkpoints", "objective")
# Keys added to the config after sweeps were recorded, each with the value under which a job
# computes what it computed before the key existed. Left out of the hash while they hold that
# value, so that a sweep recorded by an earlier qatflash is taken up, not run again.
_ADDED_KEYS: dict[tuple[str, ...], Any] = {
    ("task",): {"name": "classification"},  # the task axis: classification was the only task
    ("data", "kind"): "classification",
    # causal_lm's data keys: the classification data never reads them.
    ("data", "files"): None,
    ("data", "holdout"): {},
    ("data", "eval_length"): None,
    ("data", "eval_stride"): None,
    # generation timing and the weight-only recipes' section: off and absent before
    ("benchmark", "new_tokens"): 0,
    ("benchmark", "kv_cache"): "dynamic",
    ("benchmark", "max_duration_s"): None,
    ("benchmark", "decode"): "eager",  # compiled decode: eager only before
    ("quant", "weight_only"): None,
    ("quant", "distill"): None,  # quantization-aware distillation: none before
    ("quant", "range_lr"): None,  # learned ranges: observers set every range before
    ("quant", "lora"): None,  # QAT with LoRA: full QAT before
    ("quant", "parts"): None,  # mixed precision: one precision per recipe before
    ("sensitivity",): None,  # per-layer sensitivity: none measured before
}
# Mappings whose keys were declared after sweeps were recorded, each null where it was absent
# before (data.files' splits: null is "found by name"): their null entries are left out of the
# hash, and a mapping of nothing but nulls is the null it was.
_NULL_ENTRIES_ADDED = (("data", "files"),)
# A key whose default changed, with the earlier default: it hashes as that value in a job that never
# reads it (quant.fake_quant_start_step, 0 until null meant "by the job's kind", is read by QAT only).
_DEFAULTS_CHANGED = {("quant", "fake_quant_start_step"): 0}
# Overrides that never name a point's folder: paths would nest folders; the experiment and the
# logger name the sweep, not a point.
_PATH_KEYS = ("data.path", "data.cache_dir", "model.name_or_path")
NOT_IN_FOLDER_NAMES = ("experiment", "logger", "sweep_name", "force", *_PATH_KEYS)
# What a quantized job's FP32 reference differs in: the recipe, how latency is timed, and whether
# the float point also measured each layer's sensitivity (the mixes it chose are compared with it).
REFERENCE_KEYS = ("quant", "benchmark", "sensitivity")
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/last.ckpt"
# The package versions every results.json records.
_VERSIONED = (
    "torch",
    "transformers",
    "lightning",
    "datasets",
    "hydra-core",
    "torchmetrics",
    "wandb",
    "qatflash",
)
# Most file systems refuse names longer than 255 bytes; keep well below, with room for a digest.
_MAX_POINT_DIR = 200


@dataclass(frozen=True)
class JobContext:
    """Where a job writes and how it names itself; filled from Hydra by `job_context`."""

    folder: Path
    choices: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    group: str = "default"
    resolved_config: dict[str, Any] = field(default_factory=dict)
    # The sweep's folder when the job is one point of a multirun: what its points may share.
    sweep_dir: Path | None = None

    @property
    def config_hash(self) -> str:
        """What the job computes: its resolved config, less the keys that cannot change a result."""
        return self.hash_without()

    def hash_without(self, *keys: str) -> str:
        """The config hash less the top-level `keys` as well: jobs alike but for those keys share it
        (less `quant` and `benchmark`: a quantized job and its FP32 reference; less `seed`: the seeds
        of one point)."""
        relevant = _without_added_defaults(
            {k: v for k, v in self.resolved_config.items() if k not in (*NOT_RESULT_KEYS, *keys)}
        )
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run_name(self, *details: str) -> str:
        """The tracker's name for the run: its choices of model, data, quant and attention, then `details`."""
        groups = ("model", "data", "quant", "attention")
        return "-".join([*(self.choices[g] for g in groups if g in self.choices), *details])


def _without_added_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """`config` less each key of `_ADDED_KEYS` that holds the value reproducing the earlier behaviour,
    with each `_DEFAULTS_CHANGED` key a job that does not train QAT holds at null as its earlier value."""
    config = copy.deepcopy(config)
    for path in _NULL_ENTRIES_ADDED:
        section, key = _parent(config, path)
        if isinstance(section, dict) and isinstance(section.get(key), dict):
            section[key] = {k: v for k, v in section[key].items() if v is not None} or None
    quant = config.get("quant")
    if isinstance(quant, dict) and quant.get("method") != "qat":
        for path, earlier in _DEFAULTS_CHANGED.items():
            section, key = _parent(config, path)
            if isinstance(section, dict) and section.get(key, earlier) is None:
                section[key] = earlier
    for path, earlier in _ADDED_KEYS.items():
        section, key = _parent(config, path)
        if isinstance(section, dict) and section.get(key, object()) == earlier:
            del section[key]
    return config


def _parent(config: dict[str, Any], path: tuple[str, ...]) -> tuple[Any, str]:
    """The section holding `path`'s last key (None where a parent is missing), and that key."""
    *parents, key = path
    section: Any = config
    for parent in parents:
        section = section.get(parent) if isinstance(section, dict) else None
    return section, key


def job_context(cfg: DictConfig) -> JobContext:
    """The context of the Hydra job now running; a sweep point adopts the folder in which the sweep
    recorded the same job under another name (a narrower command, or the naming before)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    job = JobContext(
        folder=Path(hc.runtime.output_dir),
        choices={
            k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra")
        },
        overrides=list(hc.overrides.task),
        group=f"{cfg.experiment_name}/{Path(hc.sweep.dir).name}" if sweeping else cfg.experiment_name,
        resolved_config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        sweep_dir=Path(hc.sweep.dir) if sweeping else None,
    )
    if job.sweep_dir is not None and process_rank() == 0 and read_results(job.folder) is None:
        earlier = _earlier_folder(job)
        if earlier is not None:
            _move_into(earlier, job.folder)
    return job


def point_dir(overrides: str) -> str:
    """A sweep point's folder name: the overrides the sweep varies, readable and the same for the same command.

    A point with none gets `base`; one whose overrides would exceed a file name's limit keeps their
    readable start and a digest of all of them, so distinct points never collide.
    """
    if not overrides:
        return "base"
    if len(overrides.encode()) <= _MAX_POINT_DIR:
        return overrides
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
    return f"{overrides.encode()[: _MAX_POINT_DIR - 13].decode(errors='ignore')}-{digest}"


def folder_name_exclusions(argv: list[str]) -> str | None:
    """For a multirun command line: the Hydra override that leaves out of point folders' names every
    key the command holds constant (they are in results.json and multirun.yaml), so that a folder is
    named by what varies. None for a single run."""
    if not ({"-m", "--multirun"} & set(argv)):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [a for a in argv if not a.startswith("-") and "=" in a and not a.startswith("hydra")]
    constant = [
        o.key_or_group for o in OverridesParser.create().parse_overrides(lines) if not o.is_sweep_override()
    ]
    keys = list(dict.fromkeys([*NOT_IN_FOLDER_NAMES, *constant]))
    return f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]"


def _earlier_folder(job: JobContext) -> Path | None:
    """Where this sweep recorded the same job before under another name: the folder its overrides
    named before points were named by what varies, or one whose record has this config hash (the
    same point of a sweep run with fewer or more values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert job.sweep_dir is not None
    parsed = OverridesParser.create().parse_overrides(job.overrides)
    named = [str(o.input_line) for o in parsed if o.key_or_group not in NOT_IN_FOLDER_NAMES]
    candidates = [job.sweep_dir / point_dir(",".join(sorted(named)))]
    candidates += sorted(p.parent for p in job.sweep_dir.glob(f"*/{RESULTS_FILE}"))
    for folder in candidates:
        record = read_results(folder)
        same = folder == candidates[0] or (record or {}).get("config_hash") == job.config_hash
        if folder != job.folder and record is not None and same:
            return folder
    return None


def _move_into(earlier: Path, folder: Path) -> None:
    """Move a point's record, checkpoints and artifacts into `folder` (Hydra's own files stay)."""
    for entry in earlier.iterdir():
        if entry.name not in (".hydra", "qatflash.log") and not (folder / entry.name).exists():
            shutil.move(str(entry), folder / entry.name)
    log.info("took up the point recorded in %s", earlier)


def process_rank() -> int:
    """This process's rank under a multi-process launch (torchrun, Lightning's ddp, srun), else 0."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


def resolve_device(key: str, value: str) -> torch.device:
    """The device a job's models run on, from the config key that names it (`trainer.accelerator`:
    cpu, gpu, cuda, mps or auto; `bench.device`: cpu or cuda). CUDA comes with its index (the
    current device): torch calls that set per-device state (a memory cap) refuse a bare "cuda",
    and every model and input of the job is placed on exactly this device."""
    import torch

    if value in ("gpu", "cuda") or (value == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={value} but no CUDA device is visible; use cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(value if value == "mps" else "cpu")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What a figure was measured with: versions, CPU, threads and, once known, the device."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    env.update({name: _version(name) for name in _VERSIONED})
    env.update(cpu=_cpu_model(), threads=torch.get_num_threads(), cuda=torch.version.cuda)
    env["slurm"] = slurm.job_facts()
    if device is not None:
        env["device"] = device.type
        env["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else env["cpu"]
    return env


class OpenJob:
    """A job whose record is open (`running`): tracking starts once its refusals have passed."""

    def __init__(
        self, job: JobContext, record: RunRecord, logger: LoggerConfig, stack: contextlib.ExitStack
    ) -> None:
        self.job, self.record, self._logger, self._stack = job, record, logger, stack

    def track(self, name: str, job_type: str, config: dict[str, Any]) -> Tracker:
        """Open the tracker's run (closed, marked failed if the job fails, when the job ends)."""
        from qatflash.tracking import Tracker

        tracker = Tracker(self._logger, self.job.folder, name, self.job.group, job_type, config)
        self._stack.enter_context(tracker)
        self.record.data["warnings"] = tracker.warnings  # the same list: warnings at finish land too
        return tracker


@contextlib.contextmanager
def open_job(job: JobContext, logger: LoggerConfig, seed: int, params: dict[str, Any]) -> Iterator[OpenJob]:
    """The record (`running` on entry, `ok` or `failed` on exit) and the seed of one job.

    Only rank 0 of a multi-process launch writes the record or opens a tracker run; the others
    compute the same job without writing.
    """
    import lightning as L

    rank_zero = process_rank() == 0
    slurm.follow_cpus_per_task()  # before `environment` records the threads
    record = RunRecord(job.folder, job.choices, params, job.config_hash, write=rank_zero)
    record.data["reference_hash"] = job.hash_without(*REFERENCE_KEYS)
    record.data["seed_group_hash"] = job.hash_without("seed")
    record.data["env"] = environment()
    with record, contextlib.ExitStack() as stack:
        L.seed_everything(seed, workers=True, verbose=False)
        yield OpenJob(job, record, logger if rank_zero else replace(logger, kind="none"), stack)


def resumable(folder: Path, previous: dict[str, Any] | None, config_hash: str, force: bool) -> str | None:
    """The checkpoint of an earlier, unfinished attempt of this same job in this folder, if any.

    An ok attempt is redone from scratch, and so is one of another config (its checkpoint is
    overwritten); force=true always starts over.
    """
    checkpoint = folder / LAST_CHECKPOINT
    resuming = unfinished(previous, config_hash, force)
    return str(checkpoint) if resuming and checkpoint.is_file() else None


def unfinished(previous: dict[str, Any] | None, config_hash: str, force: bool) -> bool:
    """Whether the folder's earlier attempt was this same job and did not finish (and force=false):
    what it wrote may be taken up."""
    if previous is None or force:
        return False
    return previous.get("status") != "ok" and previous.get("config_hash") == config_hash


def checkpointing(folder: Path) -> list[L.Callback]:
    """Epoch-end `checkpoints/last.ckpt` with the RNG states: what a killed job resumes from.

    Epoch ends, because Lightning resumes a plain DataLoader mid-epoch only approximately (it
    restarts the epoch's batches); from an epoch end the resumed run is the uninterrupted one.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from qatflash.callbacks import RngState

    # One file, replaced every epoch (Lightning writes `save_last` copies only beside a top-k file).
    last = ModelCheckpoint(
        dirpath=folder / CHECKPOINT_DIR, filename=Path(LAST_CHECKPOINT).stem, enable_version_counter=False
    )
    return [last, RngState()]
