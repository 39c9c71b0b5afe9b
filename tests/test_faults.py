"""Faults a job survives: killed mid-training, corrupt or tampered files, secrets in the environment."""

from __future__ import annotations

import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST

from qatflash.errors import UnreadableFileError
from qatflash.results import read_results
from qatflash.storage import load_tensors

# Three epochs of a second or two each: long enough to be killed in the middle, short for a test.
TRAIN = [
    *FAST,
    "trainer.max_epochs=3",
    "logger=csv",
    "benchmark.enabled=false",
]
LAST = Path("checkpoints") / "last.ckpt"


def _kill_after_first_checkpoint(run_dir: Path, sig: signal.Signals) -> None:
    """Run the job in its own process and send it `sig` once the first epoch's checkpoint exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qatflash", *TRAIN, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / LAST).is_file():
        assert proc.poll() is None, "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=120)


@pytest.mark.processes
def test_a_job_killed_mid_training_resumes_to_the_uninterrupted_result(run_app, tmp_path: Path) -> None:
    code, stderr = run_app(*TRAIN, f"hydra.run.dir={tmp_path / 'whole'}")
    assert code == 0, stderr[-2000:]
    whole = read_results(tmp_path / "whole")

    for sig, left in ((signal.SIGKILL, "running"), (signal.SIGTERM, "failed")):
        run_dir = tmp_path / sig.name
        _kill_after_first_checkpoint(run_dir, sig)
        assert read_results(run_dir)["status"] == left  # never `ok`
        checkpoint = load_tensors(run_dir / LAST, "checkpoint")
        assert checkpoint["epoch"] < 2  # killed mid-training
        if sig == signal.SIGKILL:
            _check_truncated_checkpoint_refused(run_app, run_dir, tmp_path / "truncated")

        code, stderr = run_app(*TRAIN, f"hydra.run.dir={run_dir}")  # the same command again
        assert code == 0, stderr[-2000:]
        resumed = read_results(run_dir)
        assert (resumed["status"], resumed["attempt"]) == ("ok", 2), sig.name
        # It took up training where the checkpoint left it, not from step 0 (a restart from the same
        # seed would end with the same metrics too).
        assert resumed["resumed_from"] == {
            "checkpoint": str(LAST),
            "attempt": 1,
            "global_step": checkpoint["global_step"],
        }
        assert checkpoint["global_step"] > 0
        assert resumed["metrics"].keys() == whole["metrics"].keys()
        for key, value in whole["metrics"].items():
            assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), (sig.name, key)
        assert not (run_dir / LAST).exists()  # an ok job keeps no checkpoint unless keep_checkpoints=true


def _check_truncated_checkpoint_refused(run_app, killed: Path, run_dir: Path) -> None:
    """A copy of the killed job with its checkpoint cut short: the resume fails, naming the file."""
    shutil.copytree(killed, run_dir)
    checkpoint = run_dir / LAST
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    code, stderr = run_app(*TRAIN, f"hydra.run.dir={run_dir}")
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert f"checkpoint {checkpoint} is unreadable (truncated or corrupt" in line and "force=true" in line
    assert read_results(run_dir)["status"] == "failed"
    code, stderr = run_app(*TRAIN, f"hydra.run.dir={run_dir}", "force=true")  # starts the point over
    assert code == 0, stderr[-2000:]
    assert (read_results(run_dir)["status"], read_results(run_dir)["resumed_from"]) == ("ok", None)


class _Payload:
    """What a tampered checkpoint would carry: unpickling it runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    tampered = tmp_path / "model.pt"
    tampered.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, tmp_path / "zipped.pt")
    for path in (tampered, tmp_path / "zipped.pt"):
        with pytest.raises(
            UnreadableFileError, match="holds more than tensors and plain values, refused unread"
        ):
            load_tensors(path, "checkpoint")
    assert not marker.exists()


def test_secrets_in_the_environment_reach_no_file_of_the_run(run_app, tmp_path: Path, monkeypatch) -> None:
    secret = "qatflash-test-secret-0123456789abcdef"
    for name in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, secret)
    run_dir = tmp_path / "run"
    code, stderr = run_app(*FAST, "logger=wandb", f"hydra.run.dir={run_dir}")
    assert code == 0, stderr[-2000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "results.json" for p in files) and any(".wandb" in p.name for p in files)
    leaking = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaking


def test_an_out_of_memory_point_is_recorded_and_the_sweep_goes_on(run_app, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # A 10^12-wide feed-forward layer: the CPU allocator refuses it, as a GPU would a too-long sequence.
    code, _ = run_app(
        "-m",
        "model.arch.intermediate_size=512,1000000000000",
        *TRAIN[:-3],
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert code != 0  # the command says that a point failed
    by_size = {r["resolved_size"]: r for r in _sweep_points(sweep)}
    assert by_size[512]["status"] == "ok"
    failed = by_size[10**12]
    assert failed["status"] == "failed" and "can't allocate memory" in failed["error"]
    assert (failed["folder"] / failed["traceback"]).is_file()


def _sweep_points(sweep: Path) -> list[dict]:
    points = []
    for path in sweep.glob("*/results.json"):
        record = read_results(path)
        size = [o for o in record["params"]["overrides"] if o.startswith("model.arch.intermediate_size=")]
        points.append({**record, "resolved_size": int(size[0].split("=")[1]), "folder": path.parent})
    return points
