"""Results schema 2 reads schema 1: a sweep recorded before the float/quantized vocabulary still
reports (under the new names) and resumes (its finished points are skipped, not run again).

The fixture is a real two-point sweep (quant=fp32,ptq_dynamic, tiny_bert on the synthetic task)
recorded by qatflash at commit 22a17aa, schema 1, with its model files left out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST

from qatflash.report import write_report
from qatflash.results import SCHEMA_VERSION, read_examples, read_results, upgrade

SCHEMA_1 = Path(__file__).parent / "fixtures" / "schema1_sweep"
POINTS = ("quant=fp32", "quant=ptq_dynamic")


def test_a_schema_1_record_reads_as_schema_2() -> None:
    raw = (SCHEMA_1 / "quant=ptq_dynamic" / "results.json").read_text()
    assert '"schema": 1' in raw and '"test/acc_int8"' in raw
    results = read_results(SCHEMA_1 / "quant=ptq_dynamic")
    assert results["schema"] == SCHEMA_VERSION == 2
    metrics = results["metrics"]
    assert metrics["test/acc_quantized"] == metrics["test/acc"] and "test/acc_float" in metrics
    assert not [k for k in metrics if k.endswith(("_int8", "_fp32"))]
    model = results["model"]
    assert model["artifact"] == "int8_model.pt" and model["quantized_bytes"] < model["float_bytes"]
    rows = {row["variant"]: row for row in results["latency"]}
    assert set(rows) == {"float", "quantized"}
    assert rows["quantized"]["ratio_reference"] == "float/torch" and rows["quantized"]["ratio_to_float"] > 0
    assert results["examples"]["models"] == ["float", "quantized"]
    examples = read_examples(SCHEMA_1 / "quant=ptq_dynamic")
    assert sorted(examples["model"].unique()) == ["float", "quantized"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("test/acc_int8", "test/acc_quantized"),
        ("test/ppl_fp32", "test/ppl_float"),
        ("test/acc_ort_int8", "test/acc_ort_int8"),  # ONNX Runtime's own INT8: int8 it is
        ("test/acc_ort_fp32", "test/acc_ort_float"),
        ("test/acc_ort_int8_qdq", "test/acc_ort_qdq"),
        ("test/acc_delta", "test/acc_delta"),
    ],
)
def test_schema_1_metric_names_map_by_their_longest_model_suffix(old: str, new: str) -> None:
    assert upgrade({"schema": 1, "metrics": {old: 1.0}})["metrics"] == {new: 1.0}


def test_onnx_runtime_rows_of_schema_1_keep_its_own_int8() -> None:
    rows = [
        {"variant": "fp32", "backend": "onnxruntime", "torch_fp32_reference": "fp32/torch"},
        {
            "variant": "int8",
            "backend": "onnxruntime",
            "ratio_to_fp32": 0.5,
            "ratio_reference": "fp32/onnxruntime",
        },
        {"variant": "int8_qdq", "backend": "onnxruntime", "torch_fp32_reference": "fp32_cpu/torch"},
        {"variant": "int8", "backend": "torch", "ratio_reference": "fp32_cpu/torch"},
    ]
    upgraded = upgrade({"schema": 1, "latency": rows})["latency"]
    assert [row["variant"] for row in upgraded] == ["float", "int8", "qdq", "quantized"]
    assert upgraded[0]["torch_float_reference"] == "float/torch"
    assert upgraded[1]["ratio_to_float"] == 0.5 and upgraded[1]["ratio_reference"] == "float/onnxruntime"
    assert upgraded[3]["ratio_reference"] == "float_at_target/torch"
    # after a CUDA fit an ONNX Runtime row's torch reference is the float model timed on the CPU
    assert upgraded[2]["torch_float_reference"] == "float_at_target/torch"


def test_a_schema_1_sweep_reports_under_the_schema_2_names(tmp_path: Path) -> None:
    report = write_report([SCHEMA_1], tmp_path)
    assert report.points == 2
    table = pd.read_csv(tmp_path / "results.csv").set_index("choices.quant")
    ptq = table.loc["ptq_dynamic"]
    assert ptq["latency.quantized.torch.p50_ms"] == ptq["shipped_p50_ms"] > 0
    assert ptq["model.quantized_bytes"] < ptq["model.float_bytes"]
    seeds = pd.read_csv(tmp_path / "quality_per_seed.csv")
    quantized = seeds[seeds["model"] == "quantized"].iloc[0]
    recorded = read_results(SCHEMA_1 / "quant=ptq_dynamic")["metrics"]
    assert quantized["accuracy"] == pytest.approx(recorded["test/acc_quantized"])
    assert quantized["delta_low"] <= quantized["delta"] <= quantized["delta_high"]


def test_a_schema_1_sweep_resumes_its_finished_points_untouched(run_app, tmp_path: Path) -> None:
    """The same command as recorded it: both points are ok under the config hash they were recorded
    with, so neither runs again (not even its results.json is rewritten)."""
    sweep = tmp_path / "sweep"
    shutil.copytree(SCHEMA_1, sweep)
    before = {point: (sweep / point / "results.json").read_bytes() for point in POINTS}
    code, stderr = run_app("-m", "quant=fp32,ptq_dynamic", *FAST, "logger=none", f"hydra.sweep.dir={sweep}")
    assert code == 0, stderr[-3000:]
    assert {point: (sweep / point / "results.json").read_bytes() for point in POINTS} == before
    assert not list(sweep.glob("*/checkpoints")) and not list(sweep.glob("*/quantized_model.pt"))
