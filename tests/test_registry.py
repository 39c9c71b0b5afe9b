"""Registries: a task, a quantization recipe and a timing backend of the user's own, named from YAML."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import toy_plugins
from conftest import FAST

from qatflash.errors import ConfigError
from qatflash.registry import Registry
from qatflash.report import write_report
from qatflash.results import read_results


def _conf(root: Path) -> Path:
    """A config folder of the user's: one option in each of three groups, each naming a class by path."""
    for group, option, text in (
        ("task", "macro_f1", "name: toy_plugins:MacroF1Task\n"),
        (
            "quant",
            "float16",
            "defaults:\n  - targets: all_linears\nmethod: ptq_dynamic\napi: toy_plugins:Float16Recipe\n",
        ),
        ("benchmark", "counting", "defaults:\n  - default\nbackends: [toy_plugins:CountingBackend]\n"),
    ):
        (root / group).mkdir(parents=True, exist_ok=True)
        (root / group / f"{option}.yaml").write_text(text)
    return root


def test_a_task_recipe_and_backend_of_ones_own_run_through_the_cli(
    run_app, learned_model, tmp_path: Path
) -> None:
    conf = _conf(tmp_path / "conf")
    run_dir = tmp_path / "run"
    toy_plugins.CountingBackend.forwards = 0
    code, stderr = run_app(
        *learned_model.overrides,
        "task=macro_f1",
        "quant=float16",
        "benchmark=counting",
        "logger=none",
        f"hydra.searchpath=[file://{conf}]",
        f"hydra.run.dir={run_dir}",
    )
    assert code == 0, stderr[-3000:]
    results = read_results(run_dir)
    assert results["status"] == "ok"
    # The task's headline figure, recorded for the report; the recipe's artifact reloaded to identical logits.
    assert results["task"] == {
        "name": "toy_plugins:MacroF1Task",
        "headline": "test/f1",
        "higher_is_better": True,
        "quality": "macro_f1",
    }
    assert results["metrics"]["test/f1_float"] >= 0.9 and "test/f1_delta" in results["metrics"]
    assert (
        results["model"]["quantized_modules"] == 13
        and results["model"]["quantized_bytes"] < results["model"]["float_bytes"]
    )
    rows = {(row["variant"], row["backend"]) for row in results["latency"]}
    assert rows == {("float", "counting"), ("quantized", "counting")}
    assert toy_plugins.CountingBackend.forwards >= 2 * results["latency"][0]["iters"]
    report = write_report([run_dir], tmp_path / "report")
    assert "test/f1" in (tmp_path / "report" / "report.md").read_text() and report.points == 1
    (row,) = pd.read_csv(tmp_path / "report" / "results.csv").to_dict("records")
    assert row["headline_value"] == results["metrics"]["test/f1"] != results["metrics"]["test/acc"]


def test_a_name_neither_registered_nor_a_path_is_refused_listing_the_names() -> None:
    registry: Registry = Registry(
        "quant.api", {"eager": "qatflash.quant.eager:EagerRecipe"}, group="qatflash.none"
    )
    with pytest.raises(
        ConfigError,
        match=r"quant.api='eagr' is not allowed; choose one of \['eager'\] or give a module:Class",
    ):
        registry.check("eagr")
    with pytest.raises(
        ConfigError, match=r"quant.api='toy_plugins:Nothing': cannot import toy_plugins:Nothing"
    ):
        registry.load("toy_plugins:Nothing")


def test_checking_a_name_imports_nothing_until_it_is_looked_up(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "lazy_plugin.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy: Registry = Registry("k", {"thing": "lazy_plugin:Thing"}, group="qatflash.none")
    lazy.check("thing")
    lazy.check("no_such_module:Nothing")  # a path is accepted as a path, not imported
    assert "lazy_plugin" not in sys.modules
    assert lazy.load("thing").__module__ == "lazy_plugin" and "lazy_plugin" in sys.modules
    monkeypatch.delitem(sys.modules, "lazy_plugin")


def test_an_installed_package_adds_a_name_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package that declares `[qatflash.tasks] macro_f1 = toy_plugins:MacroF1Task` makes `task=macro_f1`
    a name, listed and loaded like a built-in one; here a distribution's metadata on sys.path, as pip
    leaves it."""
    from qatflash.tasks import TASKS

    dist_info = tmp_path / "toy_plugins-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[qatflash.tasks]\nmacro_f1 = toy_plugins:MacroF1Task\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(TASKS, "_loaded", {})  # what this test loads stays out of the suite's registry
    assert "macro_f1" in TASKS.names()
    assert TASKS.load("macro_f1") is toy_plugins.MacroF1Task


@pytest.mark.e2e
def test_choosing_an_api_imports_only_its_module(tmp_path: Path) -> None:
    """quant=ptq_dynamic (eager) loads neither the torchao nor the pt2e recipe module. (transformers
    itself imports torchao wherever it is installed; qatflash quiets what that prints.)"""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from conftest import compose_config\n"
        "from qatflash.config import to_config\n"
        "from qatflash.quant import make_recipe\n"
        f"make_recipe(to_config(compose_config('config', {[*FAST, 'quant=ptq_dynamic']!r})).quant)\n"
        "print(*(name in sys.modules for name in ('qatflash.quant.eager', 'qatflash.quant.torchao_recipe', 'qatflash.quant.pt2e')))\n"
    )
    tests = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tests)
    assert out.stdout.split() == ["True", "False", "False"]
