"""README's "when things go wrong" table, row by row, through the command line.

Each bad input must end the command with a non-zero exit code and one line naming the value and
what is allowed, before any training step, and must leave no results.json that says `ok`.
The checks behind each row are unit-tested beside their modules; this is the user's view of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST

from qatflash.cli import bench_main
from qatflash.results import read_results


def _csv_folder(folder: Path, header: str = "text,label", rows: str = "a,0\nb,1\n", splits=None) -> Path:
    folder.mkdir()
    for split in splits or ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text(f"{header}\n{rows}")
    return folder


# (README row, overrides with {tmp} for the test's folder, a folder to prepare, exit code, message)
HYDRA, REFUSED = 1, 2
ROWS: list[tuple[str, list[str], Callable[[Path], object] | None, int, str]] = [
    ("unknown option", ["attention=fastest"], None, HYDRA, "Could not find 'attention/fastest'"),
    (
        "wrong type",
        ["data.max_length=long"],
        None,
        HYDRA,
        "Value 'long' of type 'str' could not be converted",
    ),
    ("max_length <= 0", ["data.max_length=0"], None, REFUSED, "data.max_length=0 must be > 0"),
    ("batch size <= 0", ["data.batch_size=0"], None, REFUSED, "data.batch_size=0 must be > 0"),
    (
        "bad precision",
        ["trainer.precision=8-true"],
        None,
        REFUSED,
        "trainer.precision='8-true' is not allowed",
    ),
    (
        "max_length above positions",
        ["data.max_length=600"],
        None,
        REFUSED,
        "data.max_length=600 exceeds the model's position limit 512; use <= 512",
    ),
    ("data.path missing", ["data=local", "data.path={tmp}/none"], None, REFUSED, "is not a folder"),
    (
        "split missing",
        ["data=local", "data.path={tmp}/d"],
        lambda t: _csv_folder(t / "d", splits=("train", "validation")),
        REFUSED,
        "has no 'test' file",
    ),
    (
        "empty file",
        ["data=local", "data.path={tmp}/d"],
        lambda t: _csv_folder(t / "d", rows=""),
        REFUSED,
        "needs at least one row",
    ),
    (
        "text column missing",
        ["data=local", "data.path={tmp}/d"],
        lambda t: _csv_folder(t / "d", header="review,label"),
        REFUSED,
        "data.text_column=text is not a column of the train split",
    ),
    (
        "labels vs num_labels",
        ["data=local", "data.path={tmp}/d", "data.num_labels=3"],
        lambda t: _csv_folder(t / "d"),
        REFUSED,
        "data.num_labels=3 does not match the 2 labels",
    ),
    (
        "flash_attention_2 here",
        ["attention=flash_attention_2"],
        None,
        REFUSED,
        "attention=flash_attention_2 needs",
    ),
    (
        "attention the model class lacks",
        ["model.arch.model_type=deberta-v2", "attention=sdpa"],
        None,
        REFUSED,
        "attention=sdpa is not supported by DebertaV2ForSequenceClassification; it supports ['eager'",
    ),
    (
        "model package not installed",
        ["model.name_or_path=pkg://no_such_model_package/model"],
        None,
        REFUSED,
        "model.name_or_path=pkg://no_such_model_package/model needs the Python package 'no_such_model_package'",
    ),
    (
        "SDPA kernel the device lacks",
        ["attention.sdpa_backend=efficient"],
        None,
        REFUSED,
        "attention.sdpa_backend=efficient has no kernel on cpu",
    ),
    (
        "SDPA kernel without SDPA",
        ["attention=eager", "attention.sdpa_backend=flash"],
        None,
        REFUSED,
        "attention.sdpa_backend=flash forces an SDPA kernel, but attention=eager does not use SDPA",
    ),
    (
        "unknown engine",
        ["quant=qat_x86", "quant.engine=tpu"],
        None,
        REFUSED,
        "quant.engine='tpu' is not allowed; choose one of ['x86', 'fbgemm', 'qnnpack', 'onednn']",
    ),
    (
        "patterns matching no module",
        ["quant=qat_x86", "quant.targets.include=[*mlp.fc*]"],
        None,
        REFUSED,
        "match no nn.Linear; this model's Linear layers are named like",
    ),
    (
        "attention matmuls with a fused kernel",
        ["quant=qat_x86", "quant.attention_matmuls=true", "attention=sdpa"],
        None,
        REFUSED,
        "quant.attention_matmuls=true fake-quantizes eager attention's matmuls",
    ),
    (
        "freeze before fake-quant start",
        ["quant=qat_x86", "quant.freeze_observers_step=0"],
        None,
        REFUSED,
        "must come after quant.fake_quant_start_step=0",
    ),
    (
        "float Linear outputs without the kernel",
        ["quant=qat_x86_a8w7_float_out", "quant.engine=qnnpack"],
        None,
        REFUSED,
        "quant.linear_output=float needs quant.engine in ['x86', 'fbgemm'] (fbgemm's float-output kernel), "
        "not qnnpack",
    ),
    (
        "DDP workers with pt2e graphs",
        ["quant=qat_pt2e_x86", "trainer=ddp"],
        None,
        REFUSED,
        "trainer.strategy=ddp_spawn sends the model to its workers by pickle, which quant.api=pt2e's",
    ),
    (
        "unknown benchmark backend",
        ["benchmark.backends=[onnx]"],
        None,
        REFUSED,
        "benchmark.backends entry='onnx' is not allowed",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "prepare", "code", "message"), [row[1:] for row in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_is_refused_before_training(
    run_app, tmp_path: Path, overrides: list[str], prepare, code: int, message: str
) -> None:
    if prepare is not None:
        prepare(tmp_path)
    run_dir = tmp_path / "run"
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    fast = [] if "data=local" in args else FAST  # FAST sizes the synthetic task
    exit_code, stderr = run_app(*args, *fast, "logger=csv", f"hydra.run.dir={run_dir}")
    assert exit_code == code, stderr[-2000:]
    assert message in stderr
    if code == REFUSED:
        (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
        assert message in line
    record = read_results(run_dir)
    assert record is None or record["status"] == "failed"
    # Refused before the first training step: Lightning never wrote a metric.
    assert not list(run_dir.rglob("metrics.csv"))


def test_a_bench_artifact_folder_without_an_artifact_is_refused(run_app, tmp_path: Path) -> None:
    exit_code, stderr = run_app(
        f"bench.artifact={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", entry=bench_main
    )
    assert exit_code == REFUSED
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert f"bench.artifact={tmp_path} is not a run folder with a readable results.json" in line
    assert read_results(tmp_path / "run") is None or read_results(tmp_path / "run")["status"] == "failed"
