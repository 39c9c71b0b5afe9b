"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): Hydra's submitit_slurm launcher, with
the same options, that waits for every point of a sweep. Hydra loads launchers only from the
`hydra_plugins` package, hence this module's place; what a job does under SLURM is `qatflash.slurm`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import config as submitit_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import OmegaConf

from qatflash.errors import first_line
from qatflash.results import RESULTS_FILE, read_results, write_json_atomic
from qatflash.slurm import submitit_id

log = logging.getLogger("qatflash")


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """Hydra's submitit_slurm launcher (the same options) that waits for every point.

    submitit's own wait raises at the first job that ended without a result (cancelled, killed
    for memory, its node lost), and leaves the points after it running unwatched; a user re-running
    the sweep then would start them twice. Here such a job becomes that point's failure: its
    record, if the job could not write it, is marked failed with the job's SLURM state, the other
    points are waited for, and Hydra reports the failure once all have ended.
    """

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        executor = submitit.AutoExecutor(
            folder=self.params["submitit_folder"],
            cluster="slurm",
            slurm_max_num_timeout=self.params["max_num_timeout"],
        )
        shared = set(OmegaConf.structured(submitit_config.BaseQueueConf).keys())  # unprefixed
        executor.update_parameters(
            **{
                key if key in shared else f"slurm_{key}": value
                for key, value in self.params.items()
                if key not in ("submitit_folder", "max_num_timeout")
            }
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        state = Singleton.get_state()
        calls = []  # the arguments of `self.__call__` in each job
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            calls.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", state))
        jobs = executor.map_array(self, *zip(*calls, strict=True))
        log.info("submitted %d point(s) to SLURM: jobs %s", len(jobs), ", ".join(j.job_id for j in jobs))
        return [_outcome(job, list(o), sweep_dir) for job, o in zip(jobs, job_overrides, strict=True)]


def _outcome(job: Any, overrides: list[str], sweep_dir: Path) -> JobReturn:
    """The point's JobReturn; a job that ended without one (killed, cancelled, or crashed outside
    Hydra's job runner) gives a failed return naming its state and submitit's reason."""
    try:
        return job.results()[0]
    except Exception as error:  # whatever keeps the result from us is this point's failure, not the sweep's
        reason = first_line(error, with_type=False)
        failure = RuntimeError(f"SLURM job {job.job_id} ended {job.state} without a result: {reason}")
        log.error("point failed: %s (%s)", failure, " ".join(overrides))
        _mark_unfinished_records(sweep_dir, job.job_id, str(failure))
        return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=failure)


def _mark_unfinished_records(sweep_dir: Path, job_id: str, reason: str) -> None:
    """A record still `running` that this job wrote was cut off (SIGKILL, lost node): mark it failed."""
    for path in sweep_dir.glob(f"*/{RESULTS_FILE}"):
        record = read_results(path)
        slurm = ((record or {}).get("env") or {}).get("slurm") or {}
        if record is not None and record.get("status") == "running" and submitit_id(slurm) == job_id:
            write_json_atomic(path, {**record, "status": "failed", "error": reason})
