"""qatflash-report on real results: CSV, Markdown, PNGs and HTML; bad points skipped and listed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import LM_FAST, TINY_DECODER
from google.protobuf.message import DecodeError
from omegaconf import OmegaConf
from wandb_files import records

from qatflash.bench.app import run_benchmark
from qatflash.cli import report_main
from qatflash.config import to_config
from qatflash.job import JobContext
from qatflash.pipeline import run
from qatflash.preflight import compose_config
from qatflash.report import write_report
from qatflash.report.figures import pareto_latency, pareto_mask, shipped_latency


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, trained_runs: Path) -> Path:
    """Two training points, two benchmark jobs, a truncated results.json and a killed (running) one."""
    root = tmp_path_factory.mktemp("sweep")
    shutil.copytree(trained_runs, root, dirs_exist_ok=True)
    for attention in ("sdpa", "sdpa_flash"):  # the same implementation, the second forced onto one kernel
        overrides = [
            "model=tiny_bert",
            f"attention={attention}",
            "logger=none",
            "benchmark.min_iters=2",
            "benchmark.warmup=0",
            "benchmark.min_duration_s=0",
            "bench.seq_lens=[32,128]",
            "bench.isolate=false",
        ]
        config = to_config(compose_config("bench", overrides))
        run_benchmark(config, JobContext(folder=root / attention, choices={"attention": attention}))
    (root / "truncated").mkdir()
    (root / "truncated" / "results.json").write_text('{"schema": 1, "status": "ok", "metr')
    (root / "killed").mkdir()
    (root / "killed" / "results.json").write_text(json.dumps({"schema": 1, "status": "running"}))
    return root


def test_report_writes_every_output_and_lists_what_it_skipped(sweep: Path, tmp_path: Path, capsys) -> None:
    report_main([str(sweep), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "truncated" in captured.err and "status 'running'" in captured.err
    for name in ("results.csv", "report.md", "report.html", "pareto.png", "scaling.png", "sizes.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == 6  # two training jobs, and one row per benchmark point
    training = table[table["choices.quant"].notna()].set_index("choices.quant")
    assert (
        training.loc["ptq_dynamic", "model.quantized_bytes"]
        < training.loc["ptq_dynamic", "model.float_bytes"]
    )
    # The shipped model's figures: INT8 where the job made one, its ratio paired with FP32's rounds.
    ptq = training.loc["ptq_dynamic"]
    assert ptq["shipped_p50_ms"] == ptq["latency.quantized.torch.p50_ms"]
    assert ptq["shipped_ratio_to_float"] == ptq["latency.quantized.torch.ratio_to_float"]
    assert pd.isna(training.loc["fp32", "shipped_ratio_to_float"])  # float is its own reference
    assert sorted(table["bench.seq_len"].dropna()) == [32, 32, 128, 128]
    kernels = (
        table.dropna(subset=["bench.seq_len"]).groupby("attention_kernel")["bench.seq_len"].apply(sorted)
    )
    assert kernels.to_dict() == {"sdpa": [32, 128], "sdpa[flash]": [32, 128]}
    markdown = (tmp_path / "report.md").read_text()
    assert "| quant=ptq_dynamic" in markdown and "Skipped 2 point(s)" in markdown
    assert "shipped / float latency (paired)" in markdown
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table" in html


def test_a_results_json_from_before_the_task_section_reads_as_classification(
    sweep: Path, tmp_path: Path
) -> None:
    """A point recorded by main before tasks were an axis (commit 9fca08a: no `task` section) is
    read with classification's headline beside today's points, not skipped or left blank."""
    before = Path(__file__).parent / "fixtures" / "results_before_task_section"
    report = write_report([sweep, before], tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "results.csv").set_index("point")
    old, new = table.loc[str(before)], table.loc[str(sweep / "quant=ptq_dynamic")]
    assert pd.isna(old.get("task.headline")) and new["task.headline"] == "test/acc"
    for row in (old, new):
        assert row["headline"] == "test/acc" and row["headline_value"] == row["metrics.test/acc"]
        assert row["headline_delta"] == row["metrics.test/acc_delta"] and row["higher_is_better"]
    assert report.points == 7 and len(report.skipped) == 2  # the six of the sweep, and this one


def test_quality_intervals_come_from_each_points_own_examples(sweep: Path, tmp_path: Path) -> None:
    """The per-example files of the sweep's FP32 and PTQ points give the figures the jobs recorded:
    each model's accuracy, the INT8 delta to the FP32 point found by reference hash, McNemar's
    counts; the PTQ job's own FP32 test is the FP32 point's model (one shared fine-tune), so it
    predicts identically. A point recorded before per-example results gets no interval, and says why."""
    before = Path(__file__).parent / "fixtures" / "results_before_task_section"
    write_report([sweep, before], tmp_path)
    seeds = pd.read_csv(tmp_path / "quality_per_seed.csv")
    ptq = json.loads((sweep / "quant=ptq_dynamic" / "results.json").read_text())
    rows = {(Path(r["point"]).name, r["model"]): r for r in seeds.to_dict("records")}
    int8 = rows["quant=ptq_dynamic", "quantized"]
    assert int8["accuracy"] == pytest.approx(ptq["metrics"]["test/acc_quantized"], abs=1e-9)
    assert int8["delta"] == pytest.approx(ptq["metrics"]["test/acc_delta"], abs=1e-9)
    assert int8["delta_low"] <= int8["delta"] <= int8["delta_high"]
    assert int8["mcnemar_c"] - int8["mcnemar_b"] == round(int8["delta"] * int8["examples"])
    twin = rows["quant=ptq_dynamic", "float"]
    assert twin["note"] == "identical predictions" and twin["mcnemar_p"] == 1.0
    assert rows["quant=fp32", "float"]["accuracy"] == pytest.approx(ptq["metrics"]["test/acc_float"])
    (old,) = [r for r in seeds.to_dict("records") if Path(r["point"]) == before]
    assert old["note"].startswith("no interval: the point has no examples.parquet")
    assert "Quality per seed" in (tmp_path / "report.md").read_text()


def test_report_logs_a_summary_run_to_offline_wandb(sweep: Path, tmp_path: Path) -> None:
    report_main([str(sweep), "--out", str(tmp_path), "--wandb"])
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb-core may still be writing the run's log when finish() returns (seen on a loaded machine:
    # a file without its history record, or with a record half written); wait a little for it
    deadline = time.monotonic() + 20
    while True:
        try:
            history = [r.history for r in records(run_file) if r.WhichOneof("record_type") == "history"]
        except DecodeError:
            history = []
        if history or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    logged = {item.key or item.nested_key[0] for h in history for item in h.item}
    assert {"results", "quality", "quality_per_seed", "pareto"} <= logged  # the report's tables, the plot


def test_report_refuses_folders_without_results(run_app, tmp_path: Path) -> None:
    code, stderr = run_app(str(tmp_path), entry=report_main)
    assert code == 2 and "no usable results.json" in stderr


def test_pareto_frontier_keeps_only_unbeaten_points() -> None:
    latency = pd.Series([10.0, 20.0, 15.0, 30.0, 10.0])
    accuracy = pd.Series([0.80, 0.90, 0.79, 0.95, 0.85])
    assert pareto_mask(latency, accuracy).tolist() == [False, True, False, True, True]


def test_shipped_figures_all_come_from_the_same_model() -> None:
    # An FP32 job timed in torch and ONNX Runtime ships torch FP32, the reference of the ratios:
    # its ratio is none, not ONNX Runtime's.
    table = pd.DataFrame(
        {
            "latency.quantized.torch.p50_ms": [5.0, None],
            "latency.quantized.torch.ratio_to_float": [0.6, None],
            "latency.float.torch.p50_ms": [9.0, 9.5],
            "latency.float.onnxruntime.p50_ms": [7.0, 7.5],
            "latency.float.onnxruntime.ratio_to_float": [0.8, 0.79],
        }
    )
    assert shipped_latency(table).tolist() == [5.0, 9.5]
    ratio = shipped_latency(table, "ratio_to_float")
    assert ratio[0] == 0.6 and pd.isna(ratio[1])


def test_pareto_axis_is_the_paired_ratio_when_every_point_has_one() -> None:
    # An FP32 job (its own reference: 1) beside a quantized one timed side by side: absolute p50s
    # from different minutes of a shared host are not compared.
    table = pd.DataFrame(
        {
            "latency.quantized.torch.p50_ms": [None, 30.0],
            "latency.quantized.torch.ratio_to_float": [None, 0.67],
            "latency.float.torch.p50_ms": [38.0, 46.0],
        }
    )
    latency, label = pareto_latency(table)
    assert latency.tolist() == [1.0, 0.67] and "paired" in label
    # A quantized point without a ratio (an older results.json): p50 for every point.
    latency, label = pareto_latency(table.assign(**{"latency.quantized.torch.ratio_to_float": float("nan")}))
    assert latency.tolist() == [38.0, 30.0] and "p50" in label
    # Only FP32 points: a ratio of 1 everywhere says nothing; p50.
    latency, label = pareto_latency(table.iloc[:1])
    assert latency.tolist() == [38.0] and "p50" in label


def test_language_model_points_get_perplexity_intervals_and_a_size_plot(
    make_cfg, text_corpus: Path, tmp_path: Path
) -> None:
    """An FP32 and a dynamic-PTQ decoder point: perplexity per token and per word equal to what
    each job recorded, the INT8 model's relative change to the FP32 point inside its bootstrap CI,
    a verdict at the 2 % margin, and the perplexity-vs-size plot."""
    points = {}
    for quant in ("fp32", "ptq_dynamic"):
        cfg = make_cfg(
            *LM_FAST,
            "model=llama_tiny",
            *TINY_DECODER,
            f"data.path={text_corpus}",
            "logger=none",
            f"quant={quant}",
            "benchmark=none",
        )
        resolved = OmegaConf.to_container(cfg, resolve=True)
        folder = tmp_path / "sweep" / f"quant={quant}"
        points[quant] = run(
            to_config(cfg),
            JobContext(folder, {"quant": quant, "attention": "sdpa"}, resolved_config=resolved),
        )
    report = write_report([tmp_path / "sweep"], tmp_path / "report")
    seeds = pd.read_csv(tmp_path / "report" / "quality_per_seed.csv")
    rows = {(Path(r["point"]).name, r["model"]): r for r in seeds.to_dict("records")}
    fp32, int8 = rows["quant=fp32", "float"], rows["quant=ptq_dynamic", "quantized"]
    assert fp32["ppl"] == pytest.approx(points["fp32"]["metrics"]["test/ppl"], rel=1e-5)
    assert fp32["word_ppl"] == pytest.approx(points["fp32"]["metrics"]["test/word_ppl"], rel=1e-5)
    assert fp32["ppl_low"] < fp32["ppl"] < fp32["ppl_high"]
    measured = points["ptq_dynamic"]["metrics"]["test/ppl"] / points["fp32"]["metrics"]["test/ppl"] - 1
    assert int8["delta"] == pytest.approx(measured, abs=1e-6)  # float32 sums in the job, float64 here
    assert int8["delta_low"] <= int8["delta"] <= int8["delta_high"]
    assert (
        int8["verdict"] in ("better", "non-inferior", "inconclusive", "worse")
        and 0 <= int8["wilcoxon_p"] <= 1
    )
    assert (tmp_path / "report" / "ppl_vs_size.png") in report.files
    assert "word_ppl" in (tmp_path / "report" / "report.md").read_text()
