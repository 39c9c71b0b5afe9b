"""Sweeps that survive: stable folders, failed points recorded while the others run, resume, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import FAST, run_cli

from qatflash.results import read_results

QUIET = [*FAST, "logger=none", "benchmark=none"]


def _points(sweep: Path, key: str) -> dict[str, dict]:
    """Each point's results by one of its choices or params (folder names hold every override)."""
    points = {}
    for path in sorted(sweep.glob("*/results.json")):
        results = read_results(path)
        assert results is not None, path
        points[str({**results["params"], **results["choices"]}.get(key))] = results
    return points


def test_a_failed_point_is_recorded_the_others_run_and_a_rerun_resumes(run_app, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # flash_attention_2 cannot run on a CPU: that point is refused, the other one must still finish.
    args = ["-m", "attention=eager,flash_attention_2", *QUIET, f"hydra.sweep.dir={sweep}"]
    code, _ = run_app(*args)
    assert code != 0
    points = _points(sweep, "attention")
    assert set(points) == {"eager", "flash_attention_2"}
    ok, refused = points["eager"], points["flash_attention_2"]
    assert (ok["status"], ok["attempt"]) == ("ok", 1)
    assert refused["status"] == "failed" and "attention=flash_attention_2 needs" in refused["error"]
    assert any(sweep.glob(f"attention=flash_attention_2*/{refused['traceback']}"))

    code, _ = run_app(*args)
    assert code != 0
    points = _points(sweep, "attention")
    assert points["eager"] == ok  # skipped: not even rewritten
    assert points["flash_attention_2"]["attempt"] == 2

    code, stderr = run_app("-m", "attention=eager", *QUIET, f"hydra.sweep.dir={sweep}", "force=true")
    assert code == 0, stderr[-3000:]
    assert _points(sweep, "attention")["eager"]["attempt"] == 2


def test_an_ok_point_runs_again_when_its_preset_changed(run_app, tmp_path: Path) -> None:
    presets = tmp_path / "conf" / "experiment"
    presets.mkdir(parents=True)
    preset = presets / "tweak.yaml"
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "attention=eager",
        "experiment=tweak",
        *QUIET,
        f"hydra.sweep.dir={sweep}",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
    ]

    def attempts(lr: float, *extra: str) -> int:
        preset.write_text(f"# @package _global_\nmodel:\n  optim:\n    lr: {lr}\n")
        code, stderr = run_app(*args, *extra)
        assert code == 0, stderr[-3000:]
        return _points(sweep, "attention")["eager"]["attempt"]

    assert attempts(1e-3) == 1
    assert attempts(1e-3) == 1  # unchanged: skipped
    assert attempts(1e-3, "logger=csv") == 1  # the logger changes no figure
    assert attempts(2e-3) == 2  # same folder, different config: run again


@pytest.mark.processes
def test_a_sweep_killed_with_sigkill_completes_when_run_again(run_app, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1,2", *QUIET, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qatflash", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not any(p["status"] == "ok" for p in _points(sweep, "seed").values()):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before a point finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _points(sweep, "seed")

    code, stderr = run_app(*args)
    assert code == 0, stderr[-3000:]
    after = _points(sweep, "seed")
    assert set(after) == {"0", "1", "2"}
    assert all(p["status"] == "ok" for p in after.values())
    for name, point in before.items():
        if point["status"] == "ok":
            assert after[name] == point  # finished before the kill: kept, not redone


@pytest.mark.processes
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_run_a_four_point_sweep(tmp_path: Path, launcher: str) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "attention=eager,sdpa",
        "seed=0,1",
        *QUIET,
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = [read_results(p) for p in sweep.glob("*/results.json")]
    assert len(points) == 4 and all(p["status"] == "ok" for p in points)
    assert {(p["choices"]["attention"], p["params"]["seed"]) for p in points} == {
        (a, s) for a in ("eager", "sdpa") for s in (0, 1)
    }


@pytest.mark.needs("optuna")
@pytest.mark.e2e
def test_optuna_sweeper_maximises_the_objective(run_app, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code, stderr = run_app(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=maximize",
        "model.optim.lr=tag(log,interval(1e-4,1e-2))",
        # A figure that differs between trials (accuracy at this budget may tie at chance), so the
        # best value tells maximising from minimising.
        "objective=[test/loss]",
        *QUIET,
        f"hydra.sweep.dir={sweep}",
    )
    assert code == 0, stderr[-3000:]
    points = [read_results(p) for p in sweep.glob("*/results.json")]
    assert len(points) == 3 and all(p["status"] == "ok" for p in points)
    losses = [p["metrics"]["test/loss"] for p in points]
    assert len(set(losses)) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(losses))
