"""The `qatflash` command as users run it: single runs, the documented multirun, W&B files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, run_cli
from wandb_files import run_files, run_info, summary

from qatflash.results import read_results
from qatflash.storage import load_tensors


def _results(folder: Path) -> list[dict]:
    return [read_results(p) for p in sorted(folder.rglob("results.json"))]


@pytest.mark.processes
def test_single_run_logs_to_offline_wandb(tmp_path: Path) -> None:
    proc = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = _results(tmp_path)
    assert results["status"] == "ok"
    assert (tmp_path / "run" / "qatflash.log").is_file()
    (wandb_file,) = run_files(tmp_path)
    logged = summary(wandb_file)
    assert logged["test/acc"] == pytest.approx(results["metrics"]["test/acc"])
    assert logged["latency/float/torch/p50_ms"] == pytest.approx(results["latency"][0]["p50_ms"])
    info = run_info(wandb_file)
    assert info["name"] == "tiny_bert-synthetic-fp32-sdpa-L64-s0"
    assert (info["group"], info["job_type"], info["exit_code"]) == ("default", "train", 0)
    assert info["config"]["attention"] == "sdpa" and info["config"]["max_length"] == 64
    assert info["config"]["config"]["model"]["arch"]["hidden_size"] == 128


@pytest.mark.processes
def test_documented_multirun_runs_four_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m", "attention=eager,sdpa", "data.max_length=32,64", *FAST, f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(sweep)
    assert len(results) == 4
    points = {(r["choices"]["attention"], r["params"]["max_length"]) for r in results}
    assert points == {("eager", 32), ("eager", 64), ("sdpa", 32), ("sdpa", 64)}
    for r in results:
        assert r["status"] == "ok" and r["latency"][0]["seq_len"] == r["params"]["max_length"]
    # Named by the swept keys alone (no job number, none of the constant FAST overrides), so the same
    # command lands in the same folders; hidden folders are the sweep's shared state (the FP32 fine-tune cache).
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == [f"attention={a},data.max_length={n}" for a in ("eager", "sdpa") for n in (32, 64)]
    wandb_runs = run_files(sweep)
    assert len(wandb_runs) == 4
    assert {run_info(f)["group"] for f in wandb_runs} == {"default/sweep"}


def test_wandb_failing_to_start_costs_the_job_nothing_but_wandb(
    run_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Online mode without an API key: W&B refuses to start, as it would when its service is down.
    monkeypatch.setenv("WANDB_API_KEY", "")
    code, stderr = run_app(*FAST, "logger.mode=online", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, stderr[-3000:]
    (results,) = _results(tmp_path)
    assert results["status"] == "ok" and "test/acc" in results["metrics"]
    (warning,) = results["warnings"]
    assert warning.startswith("W&B failed to start") and "csv_logs" in warning
    assert (tmp_path / "run" / "csv_logs" / "metrics.csv").is_file()


@pytest.mark.processes
def test_ddp_trains_in_spawned_workers_inside_one_job(tmp_path: Path) -> None:
    """trainer=ddp on the CPU: two gloo workers fit; the job keeps one folder, one record, one W&B run,
    and converts to INT8 the weights rank 0 trained (QAT: prepared modules, scales included)."""
    run = tmp_path / "run"
    proc = run_cli(
        *FAST, "trainer=ddp", "quant=qat_x86", "keep_checkpoints=true", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no folder per worker
    (results,) = _results(tmp_path)
    assert results["status"] == "ok" and results["params"]["overrides"].count("trainer=ddp") == 1
    (wandb_file,) = run_files(tmp_path)
    assert summary(wandb_file)["test/acc"] == pytest.approx(results["metrics"]["test/acc"])
    trained = load_tensors(run / "checkpoints" / "last.ckpt", "checkpoint")
    # 256 sentences, batch 32, two workers: each takes 4 of the 8 batches per epoch, as planned.
    assert trained["global_step"] == results["params"]["optimizer_steps"] == 4
    converted = load_tensors(run / results["model"]["artifact"], "INT8 artifact")
    assert torch.equal(converted["classifier.weight"], trained["state_dict"]["model.classifier.weight"])
    scale = "bert.encoder.layer.0.output.dense.module.weight_fake_quant.scale"
    packed = converted["bert.encoder.layer.0.output.dense.module._packed_params._packed_params"][0]
    assert torch.allclose(packed.q_per_channel_scales().float(), trained["state_dict"][f"model.{scale}"])
