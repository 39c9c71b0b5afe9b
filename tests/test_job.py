"""The job envelope: point folders named by what a sweep varies, earlier folders taken up, one writer
under a multi-process launch, a quiet, light start, and what a job does under SLURM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, run_cli
from omegaconf import OmegaConf

from qatflash.config import to_config
from qatflash.errors import ConfigError
from qatflash.job import JobContext, _earlier_folder, point_dir
from qatflash.job import environment as environment_facts
from qatflash.pipeline import run
from qatflash.results import read_results, write_json_atomic
from qatflash.slurm import Interrupted, check_tasks, follow_cpus_per_task, sigterm_interrupts

FIXTURES = Path(__file__).parent / "fixtures"
QUIET = ["benchmark=none", "logger=none", "trainer.max_epochs=1", "data.batch_size=2"]


def _headerless(folder: Path) -> Path:
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text("good movie,1\nbad film,0\ngreat fun,1\ndull plot,0\n")
    return folder


def test_points_are_named_by_the_keys_the_sweep_varies(run_app, tmp_path: Path) -> None:
    """The command a new user tried: many constant overrides, one swept key. Before, every point's
    folder began with the constants and the cut to 200 bytes took the one key that differed."""
    data = _headerless(tmp_path / "data")
    sweep = tmp_path / "sweep"
    constants = [
        "data=local",
        f"data.path={data}",
        "data.header=false",
        "data.column_names=[text,label]",
        "data.max_length=32",
        "data.group_by_length=true",
        "model.arch.hidden_size=32",
        "model.arch.intermediate_size=64",
        *QUIET,
    ]
    args = ["-m", "quant=fp32,ptq_dynamic", *constants, f"hydra.sweep.dir={sweep}"]
    code, stderr = run_app(*args)
    assert code == 0, stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "quant=fp32",
        "quant=ptq_dynamic",
    ]
    # A folder of the earlier naming (every override but the paths and the logger, as Hydra's sweeper
    # spells them: data.header=False) is taken up, not run again.
    named = [*constants, "quant=fp32"]
    overrides = sorted(_as_swept(o) for o in named if not o.startswith(("data.path=", "logger=")))
    earlier = sweep / point_dir(",".join(overrides))
    (sweep / "quant=fp32").rename(earlier)
    recorded = read_results(earlier)
    code, stderr = run_app(*args)
    assert code == 0, stderr[-3000:]
    assert read_results(sweep / "quant=fp32") == recorded  # skipped: the same ok record, moved
    assert read_results(earlier) is None


def _as_swept(override: str) -> str:
    """`override` as Hydra's basic sweeper hands it to a point (`key=false` becomes `key=False`):
    the spelling the earlier folder names were made of."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([override])
    return f"{parsed.get_key_element()}={parsed.get_value_element_as_str()}"


def test_a_folder_of_the_earlier_naming_is_taken_up_whatever_its_config_hash(tmp_path: Path) -> None:
    """A point recorded under the earlier naming by an earlier qatflash may hold another config hash
    (keys added since): its name alone identifies it. The hash scan finds only same-hash records."""
    swept = ["data.header=False", "quant=fp32", f"data.path={tmp_path}", "logger=none"]
    earlier = tmp_path / "data.header=False,quant=fp32"  # sorted, less the path and the logger
    write_json_atomic(earlier / "results.json", {"status": "ok", "config_hash": "before-the-new-keys"})
    job = JobContext(tmp_path / "quant=fp32", {}, overrides=swept, sweep_dir=tmp_path)
    assert job.config_hash != "before-the-new-keys"
    assert _earlier_folder(job) == earlier


def test_under_a_multi_process_launch_only_rank_zero_writes(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    config = to_config(make_cfg(*FAST, "logger=csv", "benchmark=none"))
    results = run(config, JobContext(folder=tmp_path, choices={"quant": "fp32"}))
    assert results["status"] == "ok" and "test/acc" in results["metrics"]  # the rank computed the job
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "csv_logs").exists()
    monkeypatch.setenv("RANK", "0")
    run(config, JobContext(folder=tmp_path, choices={"quant": "fp32"}))
    assert read_results(tmp_path)["status"] == "ok" and (tmp_path / "csv_logs").is_dir()


def test_a_point_recorded_before_the_task_axis_keeps_its_config_hash() -> None:
    """The committed record of main before this axis (commit 9fca08a): the same job hashes the
    same, so a re-run skips or resumes it; a task of another name is another job."""
    before = read_results(FIXTURES / "results_before_task_section")
    # benchmark.threads' default was null (torch's 2 threads here) then; it is 1 since: another job.
    command = [*before["params"]["overrides"], "benchmark.threads=null"]
    resolved = OmegaConf.to_container(compose_config("config", command), resolve=True)
    assert JobContext(Path("."), {}, resolved_config=resolved).config_hash == before["config_hash"]
    resolved["task"]["name"] = "toy_plugins:MacroF1Task"
    assert JobContext(Path("."), {}, resolved_config=resolved).config_hash != before["config_hash"]


def test_help_and_the_report_start_without_torch(tmp_path: Path) -> None:
    """`qatflash --help` through its entry point, and a report read and written, load no torch."""
    probe = (
        "import sys, qatflash.cli as cli\n"
        "sys.argv = ['qatflash', '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        f"cli.report_main([{str(FIXTURES / 'results_before_task_section')!r}, '--out', {str(tmp_path)!r}])\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "== Config ==" in out.stdout and (tmp_path / "report.md").is_file()
    assert out.stderr.strip().splitlines()[-1] == "False"


@pytest.mark.processes
@pytest.mark.parametrize(
    "refused",
    [
        ["attention.sdpa_backend=flash"],
        ["quant=qat_x86", "quant.fake_quant_start_step=500"],
        ["data.max_length=600"],
    ],
    ids=["before_any_data", "after_indexing", "after_tokenizing"],
)
def test_a_refused_run_prints_its_one_line_and_nothing_else(tmp_path: Path, refused: list[str]) -> None:
    proc = run_cli(*refused, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and proc.stderr.startswith("qatflash: error: ")


# --- Jobs under SLURM (what the cluster tests of tests/test_slurm.py rely on) --------------------


def test_sigterm_interrupts_a_job_at_once_and_the_handler_before_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_interrupts(), pytest.raises(Interrupted) as raised:
        os.kill(os.getpid(), signal.SIGTERM)  # handled as os.kill returns, in this frame
    assert raised.value.code == 128 + signal.SIGTERM  # a shell's exit status for a SIGTERM death
    assert "interrupted by SIGTERM" in str(raised.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_sigterm_and_one_in_a_forked_worker_do_not_interrupt_again() -> None:
    with sigterm_interrupts():
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # srun's forwarded copy, while the first one unwinds: ignored
    with sigterm_interrupts():
        pid = os.fork()  # a DataLoader worker inherits the handler; the job is its owner's to stop
        if pid == 0:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                code = 0
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _slurm_task(monkeypatch: pytest.MonkeyPatch, cpus: str) -> None:
    """The variables srun gives a one-task job step (no cluster is needed to read them)."""
    for name, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "qatflash",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_CPUS_PER_TASK": cpus,
    }.items():
        monkeypatch.setenv(name, value)


def test_under_slurm_lightning_requeues_nothing_and_threads_follow_the_task(make_cfg, monkeypatch) -> None:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from qatflash.pipeline import _trainer, preflight
    from qatflash.tasks import TASKS

    threads = torch.get_num_threads()
    _slurm_task(monkeypatch, cpus=str(threads + 1))  # not torch's own count, so following it shows
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    config = to_config(make_cfg(*FAST))
    checked = preflight(config, TASKS.load("classification")(config))
    trainer = _trainer(config, JobContext(folder=Path("unused"), choices={}), checked)
    environment = trainer._accelerator_connector.cluster_environment
    # Lightning's SLURM environment for ranks, without the auto-requeue that writes and resumes
    # hpc_ckpt files past qatflash's checks.
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    try:
        assert environment_facts()["slurm"]["cpus_per_task"] == str(threads + 1)
        follow_cpus_per_task()
        assert torch.get_num_threads() == threads + 1
        torch.set_num_threads(threads)
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))  # the user's own choice wins
        follow_cpus_per_task()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)


def test_a_run_folder_with_lightning_hpc_checkpoints_is_refused(run_app, tmp_path: Path) -> None:
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    code, stderr = run_app(*FAST, "logger=none", "benchmark=none", f"hydra.run.dir={tmp_path}")
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert "['hpc_ckpt_1.ckpt']" in line and "resumes only from checkpoints/last.ckpt" in line
    assert read_results(tmp_path)["status"] == "failed" and read_results(tmp_path)["metrics"] == {}


def test_a_ddp_fit_whose_slurm_tasks_do_not_match_its_devices_is_refused(make_cfg, monkeypatch) -> None:
    from qatflash.pipeline import preflight
    from qatflash.tasks import TASKS

    _slurm_task(monkeypatch, cpus="1")  # one task per node, as hydra.launcher.tasks_per_node's default
    config = to_config(make_cfg(*FAST, "trainer=slurm_ddp", "trainer.accelerator=cpu"))
    with pytest.raises(ConfigError, match=r"trainer.devices=2 .* has 1 task\(s\) per node on 1 node"):
        preflight(config, TASKS.load("classification")(config))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    preflight(config, TASKS.load("classification")(config))  # two tasks for two devices: accepted


def test_ddp_slurm_tasks_are_checked_per_node_and_across_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM writes tasks per node as "2(x3)" when three nodes run two each, and a fit on fewer
    nodes than the job has waits for ranks that never join, as one with too few devices does."""
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")
    monkeypatch.setenv("SLURM_NNODES", "3")
    check_tasks("ddp", devices=2, num_nodes=3)  # two devices on each of the three nodes: accepted
    for devices, num_nodes in ((2, 1), (3, 3)):
        with pytest.raises(
            ConfigError,
            match=rf"trainer.devices={devices} and trainer.num_nodes={num_nodes}, but this SLURM job has "
            r"2 task\(s\) per node on 3 node\(s\)",
        ):
            check_tasks("ddp", devices=devices, num_nodes=num_nodes)


def test_data_files_declared_splits_left_null_hash_as_before_they_were_declared() -> None:
    """data.files now declares its three splits (null: found by name): a job recorded before, with
    only the splits it named (wikitext2) or no mapping at all, keeps its config hash."""

    def hashed(files: dict[str, str | None] | None) -> str:
        return JobContext(Path("."), {}, resolved_config={"data": {"files": files}}).config_hash

    assert hashed({"train": "valid.txt", "validation": None, "test": "test.txt"}) == hashed(
        {"train": "valid.txt", "test": "test.txt"}
    )
    assert hashed(dict.fromkeys(("train", "validation", "test"))) == hashed(None) == hashed({})
    assert hashed({"train": "valid.txt", "validation": None, "test": None}) != hashed(None)


def test_a_job_without_qat_hashes_the_null_fake_quant_start_as_the_zero_it_was() -> None:
    """quant.fake_quant_start_step's default became null (by the job's kind): an FP32 or PTQ point
    recorded under the default 0 keeps its hash; a QAT point, whose schedule it decides, does not."""

    def hashed(method: str, start: int | None) -> str:
        quant = {"method": method, "fake_quant_start_step": start}
        return JobContext(Path("."), {}, resolved_config={"quant": quant}).config_hash

    assert hashed("none", None) == hashed("none", 0) and hashed("ptq_static", None) == hashed("ptq_static", 0)
    assert hashed("qat", None) != hashed("qat", 0)
