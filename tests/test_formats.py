"""The formats teams compare (FP8 rowwise, tinygemm int4, MXFP8, NVFP4) as YAML recipes that declare
their product (format/device/dtype): refused in one line where their kernels are absent, trained
with fake quantization and recorded `not shipped` where only QAT can run, shipped and paired with
the float model in their own dtype where they can; and a torchao scheme no shipped YAML uses,
run from a tests-only YAML with nothing under src/ knowing it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import FAST, LM_FAST, TINY_DECODER
from torch import nn
from torchao.quantization import MappingType
from torchao.quantization.quant_primitives import _choose_qparams_affine_tinygemm, _dequantize_affine_tinygemm

from qatflash.config import to_config
from qatflash.errors import ConfigError
from qatflash.pipeline import preflight
from qatflash.quant import make_recipe
from qatflash.quant.targeting import replace_module
from qatflash.quant.torchao_recipe import PRODUCTS
from qatflash.results import read_results
from qatflash.tasks import TASKS

TESTS_CONF = Path(__file__).parent / "fixtures" / "conf"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="these kernels may run here")


@NO_CUDA
@pytest.mark.parametrize(
    ("recipe", "needs"),
    [
        ("ptq_fp8_rowwise", "fp8_e4m3_rowwise/cuda/bfloat16 needs a CUDA GPU of compute capability ≥ 8.9"),
        ("wo_int4_tinygemm", "int4_wo_tinygemm/cuda/bfloat16 needs a CUDA GPU of compute capability ≥ 8.0"),
        ("ptq_nvfp4", "nvfp4/cuda/bfloat16 needs a CUDA GPU of compute capability ≥ 10.0"),
        ("qat_nvfp4", "even its fake quantization cannot run here: nvfp4/cuda/bfloat16 needs a CUDA GPU"),
    ],
)
def test_a_format_whose_kernels_are_absent_is_refused_in_one_line_before_data(
    run_app, tmp_path: Path, recipe: str, needs: str
) -> None:
    code, stderr = run_app(*FAST, "logger=none", f"quant={recipe}", f"hydra.run.dir={tmp_path}")
    assert code != 0 and needs in stderr
    results = read_results(tmp_path)
    assert results["status"] == "failed" and needs in results["error"] and "\n" not in results["error"]
    assert "this machine has no CUDA device" in results["error"]
    assert not results["metrics"] and not (tmp_path / "examples.parquet").exists()  # nothing ran


# A tiny decoder's job, four optimizer steps.
_LM = (*LM_FAST, "model=llama_tiny", *TINY_DECODER, "logger=none", "trainer.max_steps=4")


def _lm(run_app, corpus: Path, folder: Path, *overrides: str) -> dict:
    code, stderr = run_app(*_LM, f"data.path={corpus}", f"hydra.run.dir={folder}", *overrides)
    assert code == 0, stderr[-3000:]
    return read_results(folder)


@NO_CUDA
@pytest.mark.parametrize(
    "recipe", ["qat_fp8_rowwise", pytest.param("qat_int4_tinygemm", marks=pytest.mark.e2e)]
)
def test_qat_of_a_format_this_machine_cannot_make_records_fake_quant_quality_and_not_shipped(
    run_app, text_corpus: Path, tmp_path: Path, recipe: str
) -> None:
    """The CPU runs FP8's and int4's fake quantization but neither kernel: the job trains, scores
    its fake-quantized model, and says why nothing was shipped; no headline figure, artifact or
    quantized latency row stands in for a model that was not built. (The tiny decoder's LM head,
    315 wide, is no multiple of FP8's 16, so the blocks are the targets.)"""
    code, stderr = run_app(
        "-m",
        *_LM,
        f"data.path={text_corpus}",
        f"quant={recipe}",
        "quant/targets=encoder",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert code == 0, stderr[-3000:]  # a sweep goes on: the sweeper's objective is NaN, not an error
    (point,) = tmp_path.glob("*/results.json")
    results = read_results(point)
    assert results["status"] == "ok"
    model, metrics = results["model"], results["metrics"]
    target = str(make_recipe(to_config_of(recipe)).target())
    assert model["target"] == target and model["not_shipped"].startswith(f"{target} needs a CUDA GPU")
    assert results["warnings"] == [f"not shipped: {model['not_shipped']}"]
    assert (
        metrics["test/ppl_fakequant"] > 1
        and "test/ppl" not in metrics
        and "test/ppl_quantized" not in metrics
    )
    assert [row["variant"] for row in results["latency"]] == ["float"]
    assert not list(tmp_path.glob("*/quantized_model*")) and "artifact" not in model
    from qatflash.report import write_report

    write_report([tmp_path], tmp_path / "report")  # the float row is not shown as the shipped model's
    (row,) = pd.read_csv(tmp_path / "report" / "results.csv").to_dict("records")
    assert row["model.not_shipped"] == model["not_shipped"] and pd.isna(row["shipped_p50_ms"])


def to_config_of(recipe: str):
    from qatflash.preflight import compose_config

    return to_config(compose_config("config", [f"quant={recipe}"])).quant


@pytest.mark.e2e  # a decoder job of its own (seconds): CI runs it in make test-e2e
def test_mxfp8_qat_ships_in_bfloat16_on_the_cpu_paired_with_float_in_bfloat16(
    run_app, text_corpus: Path, tmp_path: Path
) -> None:
    """MXFP8 emulated: trained fake-quantized, converted and reloaded on the CPU in bfloat16; its
    latency is paired with the float model timed in bfloat16 there too, not the float32 one."""
    results = _lm(run_app, text_corpus, tmp_path, "quant=qat_mxfp8")
    assert results["status"] == "ok", results["error"]
    model, metrics = results["model"], results["metrics"]
    assert (model["target"], model["format"]) == ("mxfp8_emulated/cpu/bfloat16", "mxfp8_emulated")
    assert model["quantized_modules"] == 2 * 7 and "not_shipped" not in model
    assert metrics["test/ppl_quantized"] == metrics["test/ppl"]
    assert abs(metrics["test/ppl_quantized"] / metrics["test/ppl_fakequant"] - 1) < 0.02
    rows = {row["variant"]: row for row in results["latency"]}
    assert {v: (r["device"], r["dtype"]) for v, r in rows.items()} == {
        "float": ("cpu", "float32"),
        "quantized": ("cpu", "bfloat16"),
        "float_at_target": ("cpu", "bfloat16"),
    }
    assert rows["quantized"]["precision"] == "mxfp8_emulated"
    assert rows["quantized"]["ratio_reference"] == "float_at_target/torch"


def test_tinygemm_qat_fake_quantizes_with_the_scales_and_zeros_tinygemm_ships(make_cfg) -> None:
    """qat_int4_tinygemm's fake quantization computes, per group of 64, the scale and float zero
    point that Int4TilePackedTo4dTensor.from_hp computes when the model converts (its
    _choose_qparams_affine_tinygemm, on the CPU: the packing itself is CUDA's), and the weight it
    trains against is tinygemm's dequantized one exactly, a near-constant group included."""
    recipe = make_recipe(to_config(make_cfg("quant=qat_int4_tinygemm")).quant)
    group = recipe.cfg.torchao.group_size
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight[3, :group] = 0.25  # one constant group: the scale falls to eps
    weight = model[0].weight.detach().clone()
    prepared = recipe.prepare(model)
    recipe.set_phase(prepared, fake_quant=True, observe=False)
    prepared(torch.randn(2, 256, dtype=torch.bfloat16))
    fake = prepared[0].weight_fake_quantizer
    scale, zero = _choose_qparams_affine_tinygemm(
        weight,
        MappingType.ASYMMETRIC,
        (1, group),
        torch.int32,
        quant_min=0,
        quant_max=15,
        scale_dtype=torch.bfloat16,
        zero_point_dtype=torch.bfloat16,
    )
    assert fake.scale.shape == fake.zero_point.shape == (128, 256 // group)
    assert torch.equal(fake.scale, scale.reshape(128, -1)) and torch.equal(
        fake.zero_point, zero.reshape(128, -1)
    )
    from torchao.quantization.quant_primitives import _quantize_affine_tinygemm

    codes = _quantize_affine_tinygemm(weight, [1, group], scale, zero, torch.int32, 0, 15)
    shipped = _dequantize_affine_tinygemm(
        codes, [1, group], scale, zero, torch.int32, 0, 15, output_dtype=torch.bfloat16
    )
    assert torch.equal(fake(weight), shipped)


@pytest.mark.parametrize(
    ("override", "gap"),
    [
        ("quant.torchao.weight.is_symmetric=true", "(dtype, symmetric, zero point domain)"),
        ("quant.torchao.weight.zero_point_domain=int", "(dtype, symmetric, zero point domain)"),
        (
            "quant.torchao.weight.group_size=32",
            "PerGroup(group_size=32) where it ships PerGroup(group_size=64)",
        ),
    ],
)
def test_a_tinygemm_qat_that_would_simulate_other_numerics_is_refused(
    make_cfg, override: str, gap: str
) -> None:
    with pytest.raises(ConfigError, match="QAT must simulate what ships") as refused:
        to_config(make_cfg("quant=qat_int4_tinygemm", override))
    assert gap in str(refused.value)


def test_targets_a_torchao_config_cannot_take_are_refused_by_name_before_data(make_cfg) -> None:
    """Int4WeightOnlyConfig would skip (a log line) every Linear whose inputs its group does not
    divide: tiny_bert's 128-wide inputs (10 block projections and the pooler) with groups of 256 are named, before anything loads."""
    cfg = to_config(make_cfg("quant=wo_int4_tinygemm", "quant.torchao.group_size=256"))
    with pytest.raises(ConfigError, match=r"multiples of 256 .* 11 targets are not: bert.encoder.layer.0"):
        preflight(cfg, TASKS.load(cfg.task.name)(cfg), probe_kernel=False)


def test_a_target_torchao_left_float_is_refused_by_name(make_cfg) -> None:
    recipe = make_recipe(to_config(make_cfg("quant=qat_torchao_int8")).quant)
    from test_quant import _tiny_bert

    converted = recipe.converted(recipe.prepare(_tiny_bert().train()))
    recipe.check_converted(converted)
    replace_module(converted, "bert.encoder.layer.1.output.dense", nn.Linear(64, 32))
    with pytest.raises(
        ConfigError, match=r"left 1 of 14 targets float .*: bert.encoder.layer.1.output.dense"
    ):
        recipe.check_converted(copy.deepcopy(converted))


def test_a_torchao_scheme_no_shipped_yaml_uses_runs_from_a_tests_only_yaml(
    run_app, learned_model, tmp_path: Path
) -> None:
    """IntxWeightOnlyConfig int4 per group of 32, QAT derived from it (QATConfig(base_config)): a YAML
    on hydra.searchpath, nothing under src/ naming the class; it trains, converts on the CPU,
    reloads to identical logits and beats chance like its fake-quantized model."""
    assert "IntxWeightOnlyConfig" not in PRODUCTS
    code, stderr = run_app(
        *learned_model.overrides,
        "quant=qat_intx_weight_only_int4",
        "logger=none",
        f"hydra.searchpath=[file://{TESTS_CONF}]",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 0, stderr[-3000:]
    results = read_results(tmp_path)
    model, metrics = results["model"], results["metrics"]
    assert model["target"] == "intx_weight_only_int4/cpu/float32" and model["quantized_modules"] == 13
    assert (
        metrics["test/acc_fakequant"] >= 0.9
        and metrics["test/acc_quantized"] >= metrics["test/acc_fakequant"] - 8 / 256
    )
    assert model["quantized_bytes"] < model["float_bytes"] / 2


@pytest.mark.e2e  # a decoder job of its own (seconds): CI runs it in make test-e2e
def test_a_weight_only_int4_job_says_int8_nowhere(run_app, text_corpus: Path, tmp_path: Path) -> None:
    """Schema 2 names what a job made: a packed int4 job's metric names, result keys, latency
    variants, W&B summary keys and report columns say `quantized` and its format, never int8."""
    from qatflash.report import write_report
    from qatflash.results import summary_figures

    results = _lm(
        run_app, text_corpus, tmp_path / "run", "quant=wo_packed_int4", "quant.targets.exclude=[lm_head]"
    )
    assert results["status"] == "ok" and results["model"]["format"] == "int4_wo_packed"
    names = [
        *results["metrics"],
        *results["model"],
        *(f"{row['variant']} {' '.join(row)} {row['precision']}" for row in results["latency"]),
        *summary_figures(results),
        *results["examples"]["models"],
    ]
    write_report([tmp_path / "run"], tmp_path / "report")
    names += (tmp_path / "report" / "results.csv").read_text().splitlines()[0].split(",")
    assert "test/ppl_quantized" in names and "latency.quantized.torch.p50_ms" in names
    assert [n for n in names if "int8" in n.lower()] == []
    assert json.dumps(results).count("int8") == 0


@pytest.mark.parametrize("bound", ["1.0e-12", "null"])
def test_fp8_rowwise_keeps_an_all_zero_activation_row_finite_only_with_its_lower_bound(
    make_cfg, bound: str
) -> None:
    """A padding token's embedding is zero, and so is its normalized row: per-row FP8 scales it by
    0/448, and without `activation_value_lb` the row turns into NaN (0/0), which attention spreads."""
    for shipped in ("ptq_fp8_rowwise", "qat_fp8_rowwise"):  # both recipes carry the bound
        assert (
            make_recipe(to_config(make_cfg(f"quant={shipped}")).quant).convert_config.activation_value_lb
            == 1e-12
        )
    cfg = to_config(make_cfg("quant=qat_fp8_rowwise", f"quant.torchao.convert.activation_value_lb={bound}"))
    model = make_recipe(cfg.quant).prepare(nn.Sequential(nn.Linear(64, 32)))
    rows = torch.randn(3, 64)
    rows[1] = 0
    out = model(rows)
    assert out[1].isnan().all().item() == (bound == "null")
    assert out[[0, 2]].isfinite().all()


class _NaNLogits(nn.Module):
    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.full((*input_ids.shape, 11), float("nan")))


def test_a_language_models_nan_loss_fails_its_evaluation_instead_of_reading_as_zero() -> None:
    """torchmetrics' SumMetric drops NaN with a warning by default: NaN logits read as a loss of 0,
    a perplexity of 1 (an FP8 model's did, before its activation lower bound)."""
    from qatflash.config import OptimConfig
    from qatflash.language_model import CausalLanguageModel

    module = CausalLanguageModel(_NaNLogits(), OptimConfig())
    ids = torch.randint(0, 11, (2, 6))
    with pytest.raises(RuntimeError, match="nan"):
        module._accumulate({"input_ids": ids, "labels": ids}, "test")


@pytest.mark.needs("cuda")
def test_tinygemm_int4_converted_on_the_gpu_computes_what_its_qat_simulated(make_cfg) -> None:
    """On a CUDA GPU the converted layer's packed scales and zeros are the fake quantizer's, and its
    output (tinygemm's kernel) matches the fake-quantized layer's to bfloat16 rounding."""
    from torchao.quantization.utils import unpack_tinygemm_scales_and_zeros

    recipe = make_recipe(to_config(make_cfg("quant=qat_int4_tinygemm")).quant)
    group = recipe.cfg.torchao.group_size
    torch.manual_seed(0)
    prepared = recipe.prepare(nn.Sequential(nn.Linear(256, 128)).to(torch.bfloat16).cuda())
    recipe.set_phase(prepared, fake_quant=True, observe=False)
    x = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        simulated = prepared(x)
        fake = prepared[0].weight_fake_quantizer
        converted = recipe.converted(copy.deepcopy(prepared))
        recipe.check_converted(converted)
        shipped = converted(x)
    scale, zero = unpack_tinygemm_scales_and_zeros(converted[0].weight.scale_and_zero)
    assert torch.equal(scale[..., 0][: 256 // group, :128].t(), fake.scale)
    assert torch.equal(zero[..., 0][: 256 // group, :128].t(), fake.zero_point)
    assert (shipped - simulated).abs().max() <= 0.02 * simulated.abs().max()


@pytest.mark.parametrize(
    ("precision", "autocast", "timed"),
    [
        (
            "bf16-mixed",
            torch.bfloat16,
            {"float": "bfloat16 autocast", "quantized": "bfloat16", "float_at_target": "bfloat16"},
        ),
        ("bf16-true", None, {"float": "bfloat16", "quantized": "bfloat16"}),
    ],
)
def test_a_float_model_under_autocast_is_not_the_like_of_a_bfloat16_target(
    make_cfg, tmp_path: Path, precision: str, autocast: torch.dtype | None, timed: dict[str, str]
) -> None:
    """Under bf16 autocast the float model keeps float32 weights and casts them at every call: a
    bfloat16 quantized model is paired with the float model cast to bfloat16, timed beside it."""
    from qatflash.quant.ship import Shipped
    from qatflash.timing.backends import JobTiming, TimingBackend

    recipe = make_recipe(to_config(make_cfg("quant=qat_mxfp8")).quant)
    model = nn.Sequential(nn.Linear(8, 8))
    shipped = Shipped(model, True, recipe, None, copy.deepcopy(model).to(torch.bfloat16))
    job = JobTiming(shipped, torch.device("cpu"), precision, autocast, tmp_path, {}, None, 1)
    contenders = TimingBackend().job_models(job).timed
    assert {variant: c.dtype for (variant, _), c in contenders.items()} == timed
    if "float_at_target" in timed:
        twin = contenders["float_at_target", "torch"].model
        assert {p.dtype for p in twin.parameters()} == {torch.bfloat16} and twin is not model
