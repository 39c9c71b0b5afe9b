"""Jobs on a SLURM cluster: who owns the signals, how many threads a task gets, what the record
says of the job, and what a DDP fit across tasks must match.

Signals, decided once here:

- SIGTERM belongs to qatflash. SLURM sends it when a job is cancelled (`scancel`), requeued
  (`scontrol requeue`) or preempted, then SIGKILL after `KillWait`. submitit sets SIGTERM to be
  ignored ("bypass"), which would let a cancelled job run on until it is killed mid-write, its
  record left `running`. Instead every job raises `Interrupted` at once, in whichever stage it is
  in: its record becomes `failed` ("interrupted by SIGTERM") and the process ends without a result
  for submitit to pick up. A requeued job then starts again, and resumes from its epoch-end
  `checkpoints/last.ckpt`; a cancelled one stays failed until the sweep is run again.
- Lightning's SLURM environment is used for ranks and addresses only: `auto_requeue=False`, so it
  writes no `hpc_ckpt_*.ckpt` and requeues nothing on SIGUSR1. Lightning would resume from any
  `hpc_ckpt_*.ckpt` it finds in the run folder, past the config-hash and `force` checks that guard
  `last.ckpt`, so a run folder holding one is refused: `last.ckpt` is the one resume path.
- SIGUSR2 (a job near its time limit, `hydra.launcher.signal_delay_s` before it) stays submitit's:
  it resubmits the job (up to `hydra.launcher.max_num_timeout` times), which resumes the same way.

The launcher that waits for every point is Hydra's plugin `hydra_plugins.qatflash_launcher`
(`hydra/launcher=slurm`). Heavy imports wait until a job needs them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from qatflash.errors import ConfigError

if TYPE_CHECKING:
    import lightning as L

# What results.json's env.slurm records of the job a point ran in.
_JOB_VARIABLES = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT",
    "ntasks": "SLURM_NTASKS",
    "procid": "SLURM_PROCID",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "node": "SLURMD_NODENAME",
    "partition": "SLURM_JOB_PARTITION",
}
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"


class Interrupted(SystemExit):
    """The job was sent SIGTERM. A SystemExit, so that neither Hydra's job runner nor submitit
    takes it for the job's result: a requeued job is then waited for, not reported finished."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __reduce__(self) -> tuple[type[Interrupted], tuple[int]]:
        return type(self), (self.signum,)  # through a pickle (joblib's workers) with its exit code

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted by {name} (cancelled, requeued, preempted or stopped); a re-run resumes it"


def _interrupt_once(owner: int) -> Callable[[int, object], None]:
    """The SIGTERM handler of process `owner`: raise `Interrupted` once. A second SIGTERM (srun
    forwards the signal SLURM also sends the task) is ignored while the first unwinds and writes
    the record; a forked DataLoader worker that inherited the handler leaves the job to its owner."""

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    return handle


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises `Interrupted` (see the module's docstring); the handler
    before is restored after. Only the main thread can own a signal: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _interrupt_once(os.getpid()))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def job_facts() -> dict[str, str] | None:
    """The SLURM job this process runs in (ids, restarts, tasks, CPUs, node), or None outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {key: os.environ[name] for key, name in _JOB_VARIABLES.items() if name in os.environ}


def submitit_id(facts: dict[str, str]) -> str | None:
    """The id submitit knows a job by: `<array job>_<task>` for an array's task, else the job id."""
    if "array_job_id" in facts and "array_task_id" in facts:
        return f"{facts['array_job_id']}_{facts['array_task_id']}"
    return facts.get("job_id")


def follow_cpus_per_task() -> None:
    """Torch's threads = the CPUs SLURM gave this task (`--cpus-per-task`), unless OMP_NUM_THREADS
    says otherwise: torch would otherwise start a thread per CPU of the node, and jobs sharing a
    node would each run as many threads as the whole node has."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(cpus))


def lightning_plugins() -> list[L.pytorch.plugins.environments.ClusterEnvironment]:
    """Under SLURM, Lightning's SLURM environment without its auto-requeue (the module's docstring)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def check_tasks(strategy: str, devices: object, num_nodes: int) -> None:
    """A DDP fit across SLURM tasks needs one task per device on each node and the job's node
    count: otherwise the ranks wait for peers SLURM never started, until the time limit."""
    if strategy != "ddp" or "SLURM_NTASKS_PER_NODE" not in os.environ:
        return
    tasks = os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0]  # "2(x3)": 2 tasks on each of 3 nodes
    nodes = os.environ.get("SLURM_NNODES", "1")
    if str(devices) != tasks or str(num_nodes) != nodes:
        raise ConfigError(
            f"trainer.devices={devices} and trainer.num_nodes={num_nodes}, but this SLURM job has "
            f"{tasks} task(s) per node on {nodes} node(s); set hydra.launcher.tasks_per_node={devices} "
            f"and hydra.launcher.nodes={num_nodes}, or the trainer to match"
        )


def refuse_hpc_checkpoints(folder: Path) -> None:
    """A run folder with Lightning HPC checkpoints would resume from them, unchecked: refuse it."""
    found = sorted(p.name for p in folder.glob(HPC_CHECKPOINTS))
    if found:
        raise ConfigError(
            f"{folder} holds Lightning HPC checkpoints {found}, which would bypass qatflash's resume "
            f"checks; qatflash resumes only from checkpoints/last.ckpt: delete them"
        )
