"""Sweeps and DDP jobs on a real SLURM cluster (the one-node cluster of scripts/slurm-local.sh).

Every job is submitted through `hydra/launcher=slurm` with sbatch, runs under slurmd, and is
read back from its results.json, submitit's logs and SLURM's accounting (sacct). Cancelled and
requeued jobs are cancelled and requeued with scancel and scontrol, as an operator would.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import submitit
import torch
from conftest import FAST, run_cli
from wandb_files import run_files, run_info, summary

from qatflash.results import read_results
from qatflash.slurm import submitit_id

pytestmark = pytest.mark.slurm

# One CPU and a little memory per job: two jobs fit on a two-CPU node at once.
ON_SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3",
    "hydra.launcher.timeout_min=15",
]
QUICK = [*FAST, "benchmark=none", *ON_SLURM]
# Three epochs of about 2 s: long enough to be cancelled or requeued after the first checkpoint.
TRAIN = [
    *FAST,
    "data.synthetic.num_train=1024",
    "trainer.max_epochs=3",
    "logger=none",
    "benchmark=none",
    *ON_SLURM,
]
LAST = Path("checkpoints") / "last.ckpt"


def _sweep(tmp_path: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run_cli("-m", *overrides, f"hydra.sweep.dir={sweep}", cwd=tmp_path)


def _start_sweep(tmp_path: Path, sweep: Path, *overrides: str) -> subprocess.Popen[str]:
    """The sweep in the background; its output goes to <sweep>.log (a pipe left unread could fill)."""
    with Path(f"{sweep}.log").open("w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(
            [sys.executable, "-m", "qatflash", "-m", *overrides, f"hydra.sweep.dir={sweep}"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _finish(proc: subprocess.Popen[str], sweep: Path) -> str:
    """Wait for a background sweep; its output."""
    proc.wait(timeout=300)
    return Path(f"{sweep}.log").read_text()


@pytest.fixture(autouse=True)
def _no_job_left_behind():
    """A failed test leaves no job holding the node's CPUs for the tests after it."""
    yield
    subprocess.run(["scancel", "--user", getpass.getuser()], check=False)
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "jobs still queued 60 s after scancel"
        time.sleep(0.2)


def _node_cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout)


def _records(sweep: Path) -> dict[str, dict]:
    """Each point's results.json by its folder's name."""
    return {path.parent.name: read_results(path) for path in sorted(sweep.glob("*/results.json"))}


def _wait_for_checkpoints(sweep: Path, folders: list[str], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while not all((sweep / folder / LAST).is_file() for folder in folders):
        assert proc.poll() is None, f"the sweep ended before its checkpoints: {_finish(proc, sweep)[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)


def _job_of(sweep: Path, folder: str) -> str:
    """The SLURM id of the job that runs a point, as submitit and scancel name it."""
    slurm = read_results(sweep / folder)["env"]["slurm"]
    return submitit_id(slurm)


def _kill_task(job_id: str) -> None:
    """SIGKILL the process of a job's task (step 0 in `scontrol listpids`, which takes the job's own
    id, not an array task's name), not the job: `scancel --signal=KILL` cancels it with SIGTERM first."""
    pids = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, check=True).stdout
    tasks = [
        int(row[0]) for row in (line.split() for line in pids.splitlines()[1:]) if row[2:4] == ["0", "0"]
    ]
    assert tasks, pids
    for pid in tasks:
        os.kill(pid, signal.SIGKILL)


def _accounting(job: str) -> list[dict[str, str]]:
    """sacct's allocation lines of a job (or of every task of an array), once all have ended: a
    launcher returns on the results, while SLURM may still be tearing the jobs down."""
    fields = ["JobID", "State", "Submit", "Start", "End"]
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(
            ["sacct", "-j", job, "-X", "-n", "-P", "-o", ",".join(fields)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]
        if rows and all(r["End"] != "Unknown" for r in rows):
            return rows
        assert time.monotonic() < deadline, f"job {job} has not ended in SLURM's accounting: {rows}"
        time.sleep(0.5)


def _most_at_once(rows: list[dict[str, str]]) -> int:
    """The most jobs running at one time, from their start and end seconds: a job that starts in the
    second another ends does not overlap it."""
    spans = [(datetime.fromisoformat(r["Start"]), datetime.fromisoformat(r["End"])) for r in rows]
    return max(sum(start <= t < end for start, end in spans) for t, _ in spans)


def _state(job: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def four_points(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str], float]:
    """A four-point sweep, each point one array task, with W&B offline; also the control of the
    concurrency limit (no array_parallelism: as many at once as the node's CPUs allow)."""
    root = tmp_path_factory.mktemp("slurm_four")
    sweep = root / "sweep"
    started = time.time()
    proc = _sweep(root, sweep, "attention=eager,sdpa", "seed=0,1", *QUICK, "logger=wandb")
    return sweep, proc, started


def test_a_four_point_sweep_runs_on_the_cluster(four_points) -> None:
    sweep, proc, started = four_points
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(sweep)
    assert set(records) == {f"attention={a},seed={s}" for a in ("eager", "sdpa") for s in (0, 1)}
    assert all(r["status"] == "ok" for r in records.values())
    jobs = {name: submitit_id(r["env"]["slurm"]) for name, r in records.items()}
    (array,) = {r["env"]["slurm"]["array_job_id"] for r in records.values()}  # one array, a task per point
    assert sorted(jobs.values()) == [f"{array}_{i}" for i in range(4)]
    for job in jobs.values():  # submitit's logs of each point's job, beside the points
        assert "Job completed successfully" in (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()
    accounting = _accounting(array)
    assert [r["State"] for r in accounting] == ["COMPLETED"] * 4
    runs = [run_info(f) for f in run_files(sweep)]
    assert len(runs) == 4 and {r["group"] for r in runs} == {f"default/{sweep.name}"}
    assert len({r["name"] for r in runs}) == 4 and all(r["exit_code"] == 0 for r in runs)
    first = min(datetime.fromisoformat(r["End"]).timestamp() for r in accounting)
    print(f"submission to first result: {first - started:.1f} s; sweep {proc.args}")


def test_torch_threads_follow_the_cpus_slurm_gives_a_task(four_points) -> None:
    sweep, proc, _ = four_points
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The control: torch alone would start a thread per CPU of this node.
    assert torch.get_num_threads() > 1
    for record in _records(sweep).values():
        assert record["env"]["slurm"]["cpus_per_task"] == "1"
        assert record["env"]["threads"] == 1


def test_array_parallelism_limits_how_many_points_run_at_once(four_points, tmp_path: Path) -> None:
    control_sweep, control, _ = four_points
    assert control.returncode == 0, control.stderr[-3000:]
    control_array = read_results(next(control_sweep.glob("*/results.json")))["env"]["slurm"]["array_job_id"]
    assert _node_cpus() >= 2
    # Unlimited: as many points at once as the node has CPUs (one each), up to the four there are.
    assert _most_at_once(_accounting(control_array)) == min(4, _node_cpus())

    sweep = tmp_path / "sweep"
    proc = _sweep(tmp_path, sweep, "seed=0,1", *QUICK, "logger=none", "hydra.launcher.array_parallelism=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(sweep)
    assert len(records) == 2 and all(r["status"] == "ok" for r in records.values())
    (array,) = {r["env"]["slurm"]["array_job_id"] for r in records.values()}
    assert _most_at_once(_accounting(array)) == 1
    print(
        f"points at once: {_most_at_once(_accounting(control_array))} unlimited, 1 with array_parallelism=1"
    )


def test_cancelled_points_are_recorded_failed_and_a_rerun_resumes_only_them(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["seed=0,1,2", *TRAIN]
    proc = _start_sweep(tmp_path, sweep, *args)
    _wait_for_checkpoints(sweep, ["seed=0", "seed=1"], proc)
    cancelled, killed = _job_of(sweep, "seed=0"), _job_of(sweep, "seed=1")
    subprocess.run(["scancel", cancelled], check=True)  # SIGTERM: the job records itself
    # SIGKILL, as the kernel's OOM killer would: nothing of the job writes; the launcher marks it.
    _kill_task(read_results(sweep / "seed=1")["env"]["slurm"]["job_id"])
    output = _finish(proc, sweep)
    assert proc.returncode != 0  # the sweep reports its failed points, after waiting for all three

    before = _records(sweep)
    assert (before["seed=2"]["status"], before["seed=2"]["attempt"]) == ("ok", 1)
    assert before["seed=0"]["status"] == "failed"
    assert before["seed=0"]["error"].startswith("Interrupted: interrupted by SIGTERM")
    assert before["seed=1"]["status"] == "failed"
    assert before["seed=1"]["error"].startswith(f"SLURM job {killed} ended")
    assert "without a result" in before["seed=1"]["error"]
    assert "without a result" in output  # Hydra raises the first failed point's error at the end

    proc = _sweep(tmp_path, sweep, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _records(sweep)
    assert after["seed=2"] == before["seed=2"]  # ok before: skipped, not even rewritten
    for name in ("seed=0", "seed=1"):
        assert (after[name]["status"], after[name]["attempt"]) == ("ok", 2)
        assert after[name]["resumed_from"]["checkpoint"] == str(LAST)
        assert after[name]["resumed_from"]["global_step"] > 0  # from its epoch-end checkpoint, not step 0


def test_a_requeued_job_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path: Path) -> None:
    # The same point twice, side by side (one CPU each): one left alone, one requeued mid-fit.
    whole = _start_sweep(tmp_path, tmp_path / "whole", "seed=0", *TRAIN)
    sweep = tmp_path / "requeued"
    requeued = _start_sweep(tmp_path, sweep, "seed=0", *TRAIN)
    _wait_for_checkpoints(sweep, ["base"], requeued)
    job = _job_of(sweep, "base")
    subprocess.run(["scontrol", "requeue", job], check=True)
    deadline = time.monotonic() + 120
    while _state(job) != "PENDING":  # killed and back in the queue
        assert time.monotonic() < deadline, f"job {job} not requeued: {_state(job)}"
        time.sleep(0.2)
    # SLURM holds a requeued job back (BeginTime) for two minutes; an operator may release it at once.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    for proc, folder in ((whole, tmp_path / "whole"), (requeued, sweep)):
        output = _finish(proc, folder)
        assert proc.returncode == 0, output[-3000:]

    reference, resumed = read_results(tmp_path / "whole" / "base"), read_results(sweep / "base")
    assert reference["resumed_from"] is None and reference["env"]["slurm"].get("restart_count", "0") == "0"
    assert (resumed["status"], resumed["attempt"]) == ("ok", 2)
    assert resumed["env"]["slurm"]["restart_count"] == "1"  # the same job, run again by SLURM
    assert resumed["resumed_from"]["checkpoint"] == str(LAST)
    assert resumed["resumed_from"]["global_step"] > 0
    assert not list((sweep / "base").glob("hpc_ckpt_*"))  # Lightning's requeue path stayed unused
    assert resumed["metrics"].keys() == reference["metrics"].keys()
    differences = {k: abs(resumed["metrics"][k] - v) for k, v in reference["metrics"].items()}
    assert max(differences.values()) <= 1e-6, differences
    print(f"requeued job's largest metric difference: {max(differences.values()):.2e}")


def test_ddp_across_two_slurm_tasks_writes_one_record_and_one_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _sweep(
        tmp_path,
        sweep,
        "seed=0",
        *QUICK,
        "data.synthetic.num_train=1024",
        "trainer.max_epochs=3",
        "logger=wandb",
        "trainer=slurm_ddp",
        "trainer.accelerator=cpu",
        "hydra.launcher.tasks_per_node=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = _records(sweep).values()
    assert record["status"] == "ok"
    assert (record["env"]["slurm"]["ntasks"], record["env"]["slurm"]["procid"]) == ("2", "0")
    # Each of the two ranks took half of the 1,024 sentences: 16 batches of 32 per epoch, not 32,
    # as planned and as trained (the last step W&B logged is step 47 of 0-47).
    assert record["params"]["optimizer_steps"] == 3 * 16
    assert record["metrics"]["test/acc"] > 0.8  # it learned (chance is 0.5)
    job = submitit_id(record["env"]["slurm"])
    logs = sweep / ".submitit" / job
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (logs / f"{job}_1_log.err").read_text()
    # Rank 1 trained beside rank 0, then stopped: no test, no timing, nothing for a sweeper.
    assert "rank 1 of 2: fit done; rank 0 goes on alone" in (logs / f"{job}_1_log.out").read_text()
    rank0, rank1 = submitit.SlurmJob(folder=sweep / ".submitit" / "%j", job_id=job, tasks=(0, 1)).results()
    assert rank0.return_value == pytest.approx(record["metrics"]["test/acc"]) and rank1.return_value is None
    (run,) = run_files(sweep)  # one tracker run, from rank 0
    assert run_info(run)["exit_code"] == 0
    assert summary(run)["trainer/global_step"] == 3 * 16 - 1
