"""The issue's acceptance runs, end to end through the CLI (minutes each): pytest -m slow."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SST2, run_cli

from qatflash.results import read_results

pytestmark = pytest.mark.slow


def test_default_experiment_reaches_90_percent(tmp_path: Path) -> None:
    proc = run_cli("logger=none", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path)
    assert results["status"] == "ok"
    assert results["metrics"]["test/acc"] >= 0.90
    assert results["timing"]["total_s"] <= 180


@pytest.mark.needs("sst2")
@pytest.mark.needs("models")
def test_minilm_sst2_cpu_budget_reaches_86_percent(tmp_path: Path) -> None:
    proc = run_cli(
        "experiment=minilm_sst2",
        f"data.path={SST2}",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(tmp_path)
    assert results["metrics"]["test/acc"] >= 0.86
    assert results["timing"]["total_s"] <= 15 * 60
