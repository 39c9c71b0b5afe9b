"""Compose-based fixtures: tests build their configs from conf/ exactly as the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from qatflash.cli import config_dir
from qatflash.config import register_schema

# No test may reach a hub: loading code stays real, exercised on local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"

# A fast tiny_bert + synthetic job: seconds, not minutes.
FAST = [
    "data.synthetic.num_train=256",
    "data.synthetic.num_validation=64",
    "data.synthetic.num_test=128",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "benchmark.warmup=1",
    "benchmark.min_iters=3",
    "benchmark.min_duration_s=0",
]

requires_sst2 = pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 TSVs not found at {SST2}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One datasets cache per test session, so tokenization caching is exercised, never the user's."""
    return tmp_path_factory.mktemp("hf_datasets")


@pytest.fixture
def make_cfg(hf_cache: Path) -> Callable[..., DictConfig]:
    """compose(overrides) -> the DictConfig the CLI would run, with hydra's own node kept out."""
    register_schema()

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=[f"data.cache_dir={hf_cache}", *overrides])
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return cfg

    return _make


@pytest.fixture
def make_bench_cfg() -> Callable[..., DictConfig]:
    """compose(overrides) for `qatflash-bench` (conf/bench.yaml), hydra's node kept out."""
    register_schema()

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("bench", overrides=list(overrides))
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return cfg

    return _make


@pytest.fixture
def run_app(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str]]:
    """`qatflash <args>` (or another entry point) in this process, as from a shell: (exit code, stderr).

    For runs that end early or quickly (refusals, resumes): no interpreter start-up per case.
    Anything that must be killed or launched runs through `run_cli` instead.
    """
    from qatflash.cli import main

    def _run(*args: str, entry: Callable[[], None] = main) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["qatflash", *args])
        capsys.readouterr()
        try:
            entry()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        return code, capsys.readouterr().err

    return _run


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, app: str = "qatflash"
) -> subprocess.CompletedProcess[str]:
    """`python -m qatflash ...` (or `-m qatflash.bench`) in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", app, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )
