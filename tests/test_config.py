"""Every option of every config group composes and validates; bad values are refused in one line."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from qatflash.cli import config_dir
from qatflash.config import BenchAppConfig, Config, to_config
from qatflash.errors import ConfigError
from qatflash.job import point_dir

CONF = Path(config_dir())
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
# Options that need a value only the user can give, or a choice of another group.
REQUIRED = {
    ("data", "local"): ["data.path=."],
    # Language-modelling data is read by the causal_lm task only (the default task refuses it).
    ("data", "text"): ["data.path=.", "task=causal_lm"],
    ("data", "wikitext2"): ["task=causal_lm"],
    ("task", "causal_lm"): ["data=wikitext2"],
    ("schedule", "causal_lm"): ["task=causal_lm", "data=wikitext2"],
}
# Options refused by design, with the start of their one-line reason.
REFUSED = {("quant", "gptq"): "quant.api=gptq: GPTQ's kernels are CUDA-only"}
# Groups chosen through another group's value, by the name and package they are overridden as.
PACKAGED = {"schedule": "schedule@trainer"}
# Presets of `qatflash-bench` (conf/bench.yaml), and the groups it shares with `qatflash`.
BENCH_ONLY = {
    ("experiment", "attention_scaling"),
    ("experiment", "llm_attention_scaling"),
    ("experiment", "llm_decode_weight_only"),
}
SHARED = ("model", "attention", "quant", "benchmark", "logger")


def _options() -> list[tuple[str, str]]:
    return [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda v: str(v))
def test_every_option_composes_and_validates(make_cfg, make_bench_cfg, group: str, option: str) -> None:
    choice = f"{PACKAGED.get(group, group)}={option}"
    if (group, option) in REFUSED:
        with pytest.raises(ConfigError, match=re.escape(REFUSED[group, option])):
            to_config(make_cfg(choice))
        return
    if (group, option) not in BENCH_ONLY:
        assert isinstance(to_config(make_cfg(choice, *REQUIRED.get((group, option), []))), Config)
    if group in SHARED or (group, option) in BENCH_ONLY:
        assert isinstance(to_config(make_bench_cfg(choice)), BenchAppConfig)


def test_groups_mirror_the_domain() -> None:
    assert set(GROUPS) >= {
        "model",
        "data",
        "attention",
        "quant",
        "trainer",
        "logger",
        "benchmark",
        "experiment",
    }


def test_default_is_tiny_bert_on_synthetic_with_offline_wandb(make_cfg) -> None:
    config = to_config(make_cfg())
    assert config.model.arch["model_type"] == "bert" and config.model.name_or_path is None
    assert config.data.synthetic is not None
    assert (config.logger.kind, config.logger.mode) == ("wandb", "offline")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.max_length=0", "data.max_length=0 must be > 0"),
        ("data.batch_size=-4", "data.batch_size=-4 must be > 0"),
        (
            "data.eval_padding=fixed",
            "data.eval_padding='fixed' is not allowed; choose one of ['longest', 'max_length']",
        ),
        ("trainer.precision=8-true", "trainer.precision='8-true' is not allowed"),
        ("data.synthetic.evidence=4", "data.synthetic.evidence=4 must be a positive odd number"),
        ("benchmark.batch_size=0", "benchmark.batch_size=0 must be > 0"),
        ("attention.sdpa_backend=turbo", "attention.sdpa_backend='turbo' is not allowed"),
        ("logger.mode=cloud", "logger.mode='cloud' is not allowed"),
        ("model.optim.lr=0", "model.optim.lr=0.0 must be > 0"),
    ],
)
def test_bad_values_are_refused_with_one_line(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_config(make_cfg(override))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_forcing_an_sdpa_kernel_needs_sdpa(make_cfg) -> None:
    with pytest.raises(ConfigError, match="attention=eager does not use SDPA"):
        to_config(make_cfg("attention=eager", "+attention.sdpa_backend=flash"))


def test_wrong_types_are_refused_at_compose_time(make_cfg) -> None:
    with pytest.raises(ConfigCompositionException):
        make_cfg("data.max_length=long")


def test_unknown_group_option_lists_the_choices(make_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match="Available options"):
        make_cfg("attention=fastest")


@pytest.mark.e2e
def test_configs_ship_inside_the_wheel(tmp_path: Path) -> None:
    """A built wheel carries conf/ as qatflash/conf, and the installed package composes from it."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(repo),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("qatflash-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"qatflash/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert expected <= names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    probe = (
        "from hydra import compose, initialize_config_dir\n"
        "from qatflash.cli import config_dir\n"
        "from qatflash.config import register_schema, to_config\n"
        "register_schema()\n"
        "with initialize_config_dir(config_dir=config_dir(), version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['model=minilm', 'attention=eager'])\n"
        "print(config_dir()); print(to_config(cfg).attention.implementation)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(target / "qatflash" / "conf"), "eager"]


def test_point_folders_are_stable_and_fit_a_file_name() -> None:
    assert point_dir("") == "base"
    assert point_dir("attention=eager,seed=1") == "attention=eager,seed=1"
    long_a, long_b = "x=" + "a" * 300 + ",seed=0", "x=" + "a" * 300 + ",seed=1"
    # The same command lands in the same folder, in any process: a digest of the text, not hash().
    assert point_dir(long_a) == "x=" + "a" * 185 + "-" + hashlib.sha256(long_a.encode()).hexdigest()[:12]
    assert point_dir(long_a) != point_dir(long_b)  # points differing only past the cut never collide
    assert len(point_dir(long_a).encode()) <= 200 and point_dir(long_a).startswith("x=aaaa")
