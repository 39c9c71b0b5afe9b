"""Quantization: every recipe end to end on tiny_bert, observer scheduling, targeting and refusals."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from conftest import FAST, recipe_case
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.ao import quantization as tq
from torch.ao.nn import quantized as nnq
from transformers import AutoConfig

from qatflash.callbacks import RngState
from qatflash.cli import config_dir
from qatflash.config import AttentionConfig, TargetsConfig, to_config
from qatflash.data import TextClassificationData
from qatflash.errors import ConfigError
from qatflash.fit_plan import FitPlan
from qatflash.job import JobContext
from qatflash.models import build_model_from_config, load_tokenizer
from qatflash.module import SequenceClassifier
from qatflash.ort import (
    ORT_INT8_SETTINGS,
    OrtModel,
    export_onnx,
    quantize_onnx,
    weight_matmul_coverage,
)
from qatflash.pipeline import preflight, run
from qatflash.preflight import compose_config
from qatflash.quant import make_recipe
from qatflash.quant.callback import FROM_SCRATCH_START, QuantizationAwareTraining, StartRule
from qatflash.quant.eager import check_engine
from qatflash.quant.float_output import Int8LinearFloatOutput
from qatflash.quant.qdq import QuantDequant
from qatflash.quant.targeting import linear_targets
from qatflash.tasks import TASKS

# Every recipe but FP32 and GPTQ (refused with its reason: tests/test_generation.py).
RECIPES = sorted(
    p.stem for p in (Path(config_dir()) / "quant").glob("*.yaml") if p.stem not in ("fp32", "gptq")
)
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 60,
}


def _tiny_bert(vocab_size: int = 60) -> torch.nn.Module:
    hf_config = AutoConfig.for_model("bert", num_labels=2, **{**TINY, "vocab_size": vocab_size})
    return build_model_from_config(hf_config, AttentionConfig(implementation="sdpa"))


# How far the INT8 model's test accuracy may fall below the model it was converted from (its FP32
# fine-tune for PTQ, its fake-quant form for QAT) on the 256 test sentences: 8 sentences. A lost
# scale or a skipped step leaves the INT8 model near chance (0.5), far below.
INT8_ACCURACY_DROP = 8 / 256


# One recipe per quantization API runs in `make test`; the others in `make test-e2e` (CI).
ONE_PER_API = ("qat_x86", "qat_torchao_int8", "qat_pt2e_x86", "wo_packed_int4", "wo_bnb_nf4")


@pytest.mark.parametrize("recipe", [recipe_case(r, ONE_PER_API) for r in RECIPES])
def test_every_recipe_trains_converts_evaluates_and_reloads(
    make_cfg, learned_model, tmp_path: Path, recipe: str
) -> None:
    overrides = (*learned_model.overrides, "logger=none", f"quant={recipe}", "quant.calibration_batches=2")
    if recipe == "qad_x86":  # a single run: its teacher from a folder (a sweep's is tests/test_distill.py's)
        overrides += (f"quant.distill.teacher={learned_model.folder}",)
    if recipe == "qat_x86_lsq":  # its freeze at 10 % of the steps is step 0 of this 2-step fit
        overrides += ("quant.freeze_observers_step=1",)
    config = to_config(make_cfg(*overrides))
    recipe_here = make_recipe(config.quant)
    if recipe_here.unshippable() is not None and (
        config.quant.method != "qat" or recipe_here.fake_quant_unreachable() is not None
    ):
        # A format whose kernels this machine lacks (FP8 or tinygemm int4 PTQ on a CPU, NVFP4 anywhere
        # but compute capability 10): refused up front, not run.
        with pytest.raises(ConfigError, match=r"cannot run here: .* needs a CUDA GPU"):
            run(config, JobContext(folder=tmp_path, choices={"quant": recipe}))
        assert not list(tmp_path.glob("*.pt*"))
        return
    results = run(config, JobContext(folder=tmp_path, choices={"quant": recipe}))
    assert results["status"] == "ok"
    metrics, model = results["metrics"], results["model"]
    assert model["target"] == str(recipe_here.target()) and model["format"] == recipe_here.target().format
    if recipe_here.unshippable() is not None:  # QAT of such a format: trained and scored fake-quantized only
        assert model["not_shipped"] == recipe_here.unshippable()
        assert (
            metrics["test/acc_fakequant"] >= 0.9
            and "test/acc" not in metrics
            and "test/acc_quantized" not in metrics
        )
        assert {row["variant"] for row in results["latency"]} == {"float"} and not list(
            tmp_path.glob("*.pt*")
        )
        return
    if config.quant.method == "qat":  # a pretrained model (the learned one's folder): from step 0
        assert results["params"]["fake_quant_start_from"] == "default: fine-tunes a pretrained model"
        assert results["params"]["fake_quant_start_step"] == 0
    if config.quant.range_lr is not None:  # eager: scale and zero point of 3 quantizers per Linear
        assert results["params"]["learned_ranges"]["tensors"] == (78 if config.quant.api == "eager" else 13)
    if config.quant.lora is not None:
        assert results["params"]["lora"]["trainable_parameters"] > 0
    reference = metrics["test/acc_fakequant" if config.quant.method == "qat" else "test/acc_float"]
    assert reference >= 0.9, "the model converted to INT8 predicts no better than chance: nothing to compare"
    assert metrics["test/acc_quantized"] >= reference - INT8_ACCURACY_DROP
    # all_linears: 2 blocks x (q, k, v, attention out, intermediate, output) + pooler; ffn: 2 x 2;
    # qat_mxfp8: the blocks' but the keys, 2 x 5. Plus the token-embedding table.
    linears = len(linear_targets(_tiny_bert(), config.quant.targets))
    assert linears == (4 if recipe.endswith("_ffn") else 10 if recipe == "qat_mxfp8" else 13)
    assert model["quantized_modules"] == linears + (config.quant.embeddings == "int8")
    if config.quant.api != "pt2e":  # a .pt2 archive also holds the program: larger than tiny_bert's weights
        assert model["quantized_bytes"] < model["float_bytes"]
    backend = "torch_compile" if config.quant.api == "pt2e" else "torch"  # pt2e INT8 runs compiled
    rows = {(row["variant"], row["backend"]): row for row in results["latency"]}
    # pt2e's compiled INT8 is paired with float compiled too, its like (tests/test_stats.py: pairing);
    # a bfloat16 target (MXFP8) with the float model timed in bfloat16 where it runs.
    like = "float" if model["target"].endswith("/cpu/float32") else "float_at_target"
    assert set(rows) == {("float", "torch"), ("quantized", backend), (like, backend)}
    assert (
        rows["quantized", backend]["dtype"] == rows[like, backend]["dtype"] == model["target"].split("/")[2]
    )
    # Quantized is paired with float round by round (tests/test_bench.py checks the pairing); float is the reference.
    assert "ratio_to_float" in rows["quantized", backend] and "ratio_to_float" not in rows["float", "torch"]
    assert rows["quantized", backend]["ratio_reference"] == f"{like}/{backend}"


@pytest.mark.needs("onnx")
@pytest.mark.parametrize("recipe", ["ptq_dynamic", pytest.param("qat_x86", marks=pytest.mark.e2e)])
def test_onnxruntime_rows_beside_torch_with_accuracy_and_size(
    make_cfg, learned_model, tmp_path: Path, recipe: str
) -> None:
    overrides = (
        *learned_model.overrides,
        "logger=none",
        f"quant={recipe}",
        "benchmark.backends=[torch,onnxruntime]",
    )
    config = to_config(make_cfg(*overrides))
    results = run(config, JobContext(folder=tmp_path, choices={"quant": recipe}))
    rows = {(row["variant"], row["backend"]): row for row in results["latency"]}
    # ORT's dynamic INT8 of the FP32 export is every run's baseline; QAT adds its own INT8 as QDQ.
    ort_variants = ("float", "int8", "qdq") if recipe == "qat_x86" else ("float", "int8")
    assert set(rows) == {("float", "torch"), ("quantized", "torch")} | {
        (v, "onnxruntime") for v in ort_variants
    }
    # ONNX Runtime runs the export in float32, on as many threads as torch, whatever the training precision.
    assert rows["float", "onnxruntime"]["precision"] == "32-true"
    assert rows["int8", "onnxruntime"]["threads"] == rows["float", "torch"]["threads"]
    metrics, model = results["metrics"], results["model"]
    assert model["onnx_int8_bytes"] < model["onnx_float_bytes"]
    coverage = model["onnx_int8_weight_matmuls"]
    assert coverage["int8"] == coverage["weight_matmuls"] == 14 and coverage["float"] == 0
    if recipe == "ptq_dynamic":
        assert metrics["test/acc_float"] >= 0.9, (
            "the model predicts no better than chance: nothing to compare"
        )
        # The FP32 export predicts what the torch model predicts; ORT's INT8 stays near it.
        assert metrics["test/acc_ort_float"] == metrics["test/acc_float"]
        assert metrics["test/acc_ort_int8"] >= metrics["test/acc_float"] - INT8_ACCURACY_DROP
        assert "per call" in model["onnx_qdq_skipped"] and "onnx_qdq_bytes" not in model
    else:
        assert metrics["test/acc_quantized"] >= 0.9, (
            "the model predicts no better than chance: nothing to compare"
        )
        # The QDQ graph carries the QAT model's own scales: it predicts what the torch.ao INT8 model does.
        assert abs(metrics["test/acc_ort_qdq"] - metrics["test/acc_quantized"]) <= 2 / 256
        # QAT's FP32 twin is the model before fine-tuning, kept for size and latency: never scored.
        assert "test/acc_ort_float" not in metrics and "test/acc_ort_int8" not in metrics
        assert model["onnx_qdq_bytes"] < model["onnx_float_bytes"]


@pytest.mark.needs("onnx")
@pytest.mark.parametrize("op_types", [None, ["Gather"]], ids=["as_shipped", "broken_embeddings_only"])
def test_onnxruntime_dynamic_int8_runs_every_weight_matmul_in_int8(
    learned_model, tmp_path: Path, op_types: list[str] | None
) -> None:
    """Each of tiny_bert's 14 weight matmuls (2 blocks x 6 Linears, pooler, classifier) becomes a
    MatMulInteger fed by DynamicQuantizeLinear; the four activation x activation attention matmuls
    stay float. A quantization of the embedding tables alone must not pass for INT8."""
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(learned_model.model(), fp32, learned_model.batch(), max_len=512)
    quantize_onnx(fp32, int8, op_types)
    coverage = weight_matmul_coverage(fp32, int8)
    assert coverage["weight_matmuls"] == 14
    runs_in_int8 = coverage["int8"] == coverage["weight_matmuls"] and coverage["float"] == 0
    assert runs_in_int8 == (op_types is None), coverage
    if op_types is None:  # the graph is what results.json's onnx_int8_settings say ran
        import onnx

        graph = onnx.load(str(int8)).graph
        initializers = {t.name: t for t in graph.initializer}
        weight_zero_points = [initializers[n.input[3]] for n in graph.node if n.op_type == "MatMulInteger"]
        per_channel = any(len(z.dims) > 0 for z in weight_zero_points)
        weight_types = {onnx.TensorProto.DataType.Name(z.data_type) for z in weight_zero_points}
        assert (per_channel, weight_types) == (ORT_INT8_SETTINGS["per_channel"], {"INT8"})
        assert ORT_INT8_SETTINGS["weight_type"] == "QInt8"


def _scales_lost(qdq: torch.nn.Module) -> torch.nn.Module:
    """The QDQ graph with every activation quantizer as it is before any observation: scale 1, zero point 0."""
    for module in qdq.modules():
        if isinstance(module, QuantDequant):
            module.grid.scale = torch.ones_like(module.grid.scale)
            module.grid.zero_point = torch.zeros_like(module.grid.zero_point)
    return qdq


# What the ONNX file holds in each case: the recipe's QDQ graph, or one of two broken stand-ins.
QDQ_EXPORTS = {
    "qdq": lambda qdq, float_model: qdq,
    "broken_fp32_in_place": lambda qdq, float_model: float_model,
    "broken_activation_scales_lost": lambda qdq, float_model: _scales_lost(qdq),
}
# How close the QDQ graph's logits must come to the INT8 model's, as a fraction of how far
# quantization moves them from FP32 (mean absolute differences over the batch), per recipe: about
# twice what was measured on an AVX2 CPU (ONNX Runtime / QDQ in torch: qat_x86 0.060 / 0.060,
# qat_per_tensor 0.000 / 0.000, qat_x86_a8w7_float_out 0.110 / 0.110, ptq_static 0.252 / 0.252,
# pt2e - / 0; the kernels round a few activations and weights the other way). The FP32 model in
# the QDQ graph's place reads 1.0.
QDQ_TOLERANCE = {
    "qat_x86": 0.15,
    "qat_per_tensor": 0.05,
    "qat_x86_a8w7_float_out": 0.25,
    "ptq_static": 0.5,
    "qat_pt2e_x86": 0.05,
}


@pytest.mark.needs("onnx")
@pytest.mark.parametrize(
    ("recipe_name", "exported"),
    [
        ("qat_x86", "qdq"),
        *(
            pytest.param(name, "qdq", marks=pytest.mark.e2e)
            for name in ("qat_per_tensor", "qat_x86_a8w7_float_out", "ptq_static", "qat_pt2e_x86")
        ),
        pytest.param("qat_x86", "broken_fp32_in_place", marks=pytest.mark.e2e),
        pytest.param("qat_x86", "broken_activation_scales_lost", marks=pytest.mark.e2e),
    ],
)
def test_qdq_form_runs_the_recipes_own_quantization_in_onnxruntime(
    make_cfg, tmp_path: Path, recipe_name: str, exported: str
) -> None:
    """The QDQ export of a prepared model computes what the INT8 model computes, in torch and in
    ONNX Runtime, within its recipe's QDQ_TOLERANCE of the quantization effect; an export that lost its
    activation scales, or the FP32 model in its place, does not.

    Embedding tables stay float here: their QDQ form is symmetric per row (ONNX's DequantizeLinear
    takes no float zero points) where torch.ao's is affine, a difference by design. pt2e's INT8 is
    the QDQ graph itself in torch, so only the graph is compared there, not ONNX Runtime's kernels:
    pt2e quantizes activations to the full 8 bits, and ONNX Runtime's u8 x s8 kernels without VNNI
    sum pairs of products in int16, which saturates (measured: 11x the quantization effect away,
    as fbgemm is with such a recipe; `benchmarks/int8_linear.py`).
    """
    import onnx

    embeddings = [] if recipe_name == "qat_pt2e_x86" else ["quant.embeddings=float"]
    recipe = make_recipe(to_config(make_cfg(f"quant={recipe_name}", *embeddings)).quant)
    torch.manual_seed(0)  # the same weights whichever tests ran before
    float_model = _tiny_bert().eval()
    model = recipe.prepare(copy.deepcopy(float_model).train()).eval()
    ids = torch.randint(0, 60, (8, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids).index_fill_(1, torch.arange(12, 24), 0)}
    recipe.set_phase(model, fake_quant=True, observe=True)
    with torch.no_grad():
        for _ in range(3):
            model(**batch)
    recipe.set_phase(model, fake_quant=True, observe=False)
    int8 = recipe.convert(copy.deepcopy(model))
    qdq = recipe.qdq_model(model)
    path = tmp_path / "qdq.onnx"
    export_onnx(QDQ_EXPORTS[exported](qdq, float_model), path, batch, max_len=512)

    with torch.inference_mode():
        expected, in_torch, fp32 = (m(**batch).logits for m in (int8, qdq, float_model))
        in_ort = OrtModel(path, threads=1)(**batch).logits
    effect = (expected - fp32).abs().mean()
    assert effect > 0
    if exported == "qdq":
        assert (in_torch - expected).abs().mean() <= QDQ_TOLERANCE[recipe_name] * effect
        # Each targeted Linear's weight is stored int8 behind a DequantizeLinear; activations are quantized.
        graph = onnx.load(path).graph
        int8_weights = [
            t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
        ]
        ops = [node.op_type for node in graph.node]
        assert len(int8_weights) >= len(recipe.targets) and ops.count("DequantizeLinear") >= len(
            recipe.targets
        )
        assert "QuantizeLinear" in ops
    if recipe_name != "qat_pt2e_x86":
        distance = (in_ort - expected).abs().mean() / effect
        assert (distance <= QDQ_TOLERANCE[recipe_name]) == (exported == "qdq"), (
            f"{float(distance):.3f} x the effect"
        )


def test_only_targeted_linears_are_quantized_and_keyword_forwards_still_work(make_cfg) -> None:
    config = to_config(make_cfg("quant=qat_x86", "quant/targets=ffn", "quant.embeddings=float"))
    recipe = make_recipe(config.quant)
    model = recipe.prepare(_tiny_bert().train())
    ids = torch.randint(5, 60, (2, 7))
    model(
        input_ids=ids, attention_mask=torch.ones_like(ids)
    )  # keyword arguments, as every HF model takes them
    int8 = recipe.convert(model)
    kinds = {name: type(module) for name, module in int8.named_modules()}
    assert kinds["bert.encoder.layer.0.intermediate.dense.module"] is nnq.Linear
    assert kinds["bert.encoder.layer.0.attention.self.query"] is torch.nn.Linear
    assert kinds["bert.embeddings.word_embeddings"] is torch.nn.Embedding
    assert int8(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 2)


def test_patterns_matching_nothing_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"match no nn.Linear; this model's Linear layers are named like"):
        linear_targets(_tiny_bert(), TargetsConfig(include=["*mlp.fc*"]))


def test_engine_missing_from_the_build_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"quant.engine=tpu is not in this torch build; available: \["):
        check_engine("tpu")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.freeze_observers_step=0", "must come after quant.fake_quant_start_step=null (0 or later)"),
        ("quant.freeze_observers_step=0.0", "must come after quant.fake_quant_start_step=null (0 or later)"),
        (
            "quant.fake_quant_start_step=3 quant.freeze_observers_step=2",
            "quant.freeze_observers_step=2 must come after quant.fake_quant_start_step=3",
        ),
        ("quant.weight.observer=minmax", "needs a per-channel observer"),
        ("quant.activation.quant_min=300", "quant range [300, 255] is empty"),
        ("quant.embeddings=int4", "quant.embeddings='int4' is not allowed"),
    ],
)
def test_bad_quant_values_are_refused(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_config(make_cfg("quant=qat_x86", *override.split()))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "start", "why", "steps_at_8"),
    [
        # tiny_bert built from its config: float for the first 75 % of steps
        (["quant=qat_x86"], FROM_SCRATCH_START, "default: trains from scratch (float first)", 6),
        (["quant=qat_torchao_int8"], FROM_SCRATCH_START, "default: trains from scratch (float first)", 6),
        # derived from its convert config, with a switch
        (["quant=qat_fp8_rowwise"], FROM_SCRATCH_START, "default: trains from scratch (float first)", 6),
        # MX's fake quantization has no switch: from step 0, and the record says why
        (
            ["quant=qat_mxfp8"],
            0,
            "default: trains from scratch, but quant.api=torchao's fake quantization cannot be switched off",
            0,
        ),
        (["quant=qat_x86", "quant.fake_quant_start_step=3"], 3, "configured", 3),
        (["quant=qat_x86", "quant.fake_quant_start_step=0.5"], 0.5, "configured", 4),
        (["quant=qat_x86", "PRETRAINED"], 0, "default: fine-tunes a pretrained model", 0),
    ],
)
def test_the_default_fake_quant_start_follows_what_the_job_trains(
    make_cfg, tmp_path: Path, overrides: list[str], start: float, why: str, steps_at_8: int
) -> None:
    """From step 0 for a pretrained model, over the last 25 % from scratch; a configured start as given."""
    if "PRETRAINED" in overrides:  # a model folder (a saved config is enough: preflight reads no weights)
        arch = dict(to_config(make_cfg()).model.arch)
        AutoConfig.for_model(arch.pop("model_type"), **arch).save_pretrained(tmp_path)
        overrides = [o for o in overrides if o != "PRETRAINED"] + [f"model.name_or_path={tmp_path}"]
    config = to_config(make_cfg(*overrides))
    qat = preflight(config, TASKS.load("classification")(config), probe_kernel=False).qat
    assert qat is not None and (qat.start, qat.start_why) == (start, why)
    qat.check_schedule(FitPlan(256, 32, 1, 8, 1, 1, None))  # 8 optimizer steps
    assert qat.schedule() == {
        "fake_quant_start_step": steps_at_8,
        "fake_quant_start_from": why,
        "freeze_observers_step": None,
    }


def _data(config) -> TextClassificationData:
    data = TextClassificationData(config.data, lambda texts: load_tokenizer(config.model, texts), config.seed)
    data.setup()
    return data


def _quiet_trainer(**kwargs) -> L.Trainer:
    """A Trainer with no logger, progress bar or model summary: tests read callbacks and results."""
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _scales(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.scale.clone() for m in model.modules() if isinstance(m, tq.FakeQuantize)]


class _NeverFreezes(QuantizationAwareTraining):
    """Broken on purpose: observers keep moving past freeze_observers_step."""

    def observing(self, step: int) -> bool:
        return step >= self.start


class _ObservesInValidation(QuantizationAwareTraining):
    """Broken on purpose: validation batches move the scales (Lightning 1.x's callback did)."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.recipe.set_phase(pl_module.model, fake_quant=True, observe=True)


# The callback under test, and the facts about its observers that each broken stand-in breaks (a
# validation pass after the freeze step moves frozen scales too).
SCHEDULES = {
    "as_shipped": (QuantizationAwareTraining, ()),
    "broken_never_freezes": (_NeverFreezes, ("frozen after freeze_observers_step",)),
    "broken_observes_in_validation": (
        _ObservesInValidation,
        ("no validation pass moves them", "frozen after freeze_observers_step"),
    ),
}


@pytest.mark.parametrize("callback", list(SCHEDULES))
def test_observers_move_only_in_training_steps_and_stop_at_the_freeze_step(make_cfg, callback: str) -> None:
    """Sanity checks and validation never move a scale; after freeze_observers_step, training does not either."""
    config = to_config(make_cfg(*FAST, "quant=qat_x86", "data.batch_size=16"))
    data = _data(config)
    module = SequenceClassifier(_tiny_bert(len(data.tokenizer)), config.model.optim, 2)
    kind, broken_facts = SCHEDULES[callback]
    qat = kind(make_recipe(config.quant), StartRule(2, "configured"), freeze_observers_step=6)
    before_step: dict[int, list[torch.Tensor]] = {}
    validations: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            before_step[trainer.global_step] = _scales(pl_module.model)

        def on_validation_start(self, trainer, pl_module) -> None:
            validations.append((_scales(pl_module.model), []))

        def on_validation_end(self, trainer, pl_module) -> None:
            validations[-1][1].extend(_scales(pl_module.model))

    trainer = _quiet_trainer(
        max_steps=10,
        val_check_interval=4,
        limit_val_batches=2,
        num_sanity_val_steps=2,
        enable_checkpointing=False,
        callbacks=[qat, Watch()],
    )
    trainer.fit(module, datamodule=data)

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert len(validations) >= 3  # sanity check + validations at steps 4 and 8
    facts = {
        "still before fake_quant_start_step": same(before_step[0], before_step[2]),
        "moving while training": not same(before_step[2], before_step[4]),
        "frozen after freeze_observers_step": same(before_step[6], before_step[9]),
        "no validation pass moves them": all(same(start, end) for start, end in validations),
    }
    assert facts == {fact: fact not in broken_facts for fact in facts}
    assert qat.quantized_model is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant=qat_torchao_int8", "quant.freeze_observers_step=5"], "has no observers to freeze"),
        (["quant=qat_pt2e_x86", "quant.embeddings=int8"], "keeps embeddings float"),
        (["quant=qat_pt2e_x86", "quant.engine=qnnpack"], "quant.api=pt2e targets x86"),
        (
            ["quant=ptq_dynamic", "quant.api=pt2e"],
            "quant.method=ptq_dynamic is not available with quant.api=pt2e",
        ),
        (
            ["quant=ptq_dynamic", "quant.linear_output=float"],
            "quant.linear_output=float needs quant.api=eager with method ptq_static or qat",
        ),
        (
            ["quant=qat_x86_a8w7_float_out", "quant.engine=qnnpack"],
            r"quant.linear_output=float needs quant.engine in \['x86', 'fbgemm'\]",
        ),
        (
            ["quant=qat_torchao_8da4w", "quant.torchao.weight_dtype=int16"],
            "quant.torchao.weight_dtype='int16'",
        ),
    ],
)
def test_api_combinations_that_cannot_run_are_refused(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_config(make_cfg(*overrides))


def test_pt2e_graph_matches_the_float_model_on_padded_batches_of_any_shape(make_cfg) -> None:
    """The exported graph is traced once at (2, 16); padding and other shapes must give the float logits."""
    model = _tiny_bert().eval()
    recipe = make_recipe(to_config(make_cfg("quant=qat_pt2e_x86")).quant)
    prepared = recipe.prepare(copy.deepcopy(model))
    recipe.set_phase(prepared, fake_quant=False, observe=False)
    for batch, length in ((1, 5), (3, 40)):
        ids = torch.randint(5, 60, (batch, length))
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0
        with torch.inference_mode():
            expected = model(input_ids=ids, attention_mask=mask).logits
            got = prepared(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("recipe_name", "rng_state"),
    [
        pytest.param("qat_x86", True, id="qat_x86"),
        pytest.param("qat_torchao_int8", True, id="qat_torchao_int8", marks=pytest.mark.e2e),
        pytest.param("qat_x86", False, id="broken_qat_x86_without_rng_state"),
    ],
)
def test_resuming_mid_qat_reproduces_the_int8_model(
    make_cfg, tmp_path: Path, recipe_name: str, rng_state: bool
) -> None:
    """Stop after epoch 1 of 2, resume from the checkpoint: same INT8 weights and scales as one run.

    Without the RNG states in the checkpoint, the resumed run draws other dropout masks and must
    end elsewhere: the broken case shows that the comparison can tell.
    """
    config = to_config(make_cfg(*FAST, f"quant={recipe_name}", "data.batch_size=32"))
    data = _data(config)

    def fit(
        folder: Path, stop_after_first_epoch: bool, ckpt_path: str | None = None
    ) -> QuantizationAwareTraining:
        L.seed_everything(config.seed, verbose=False)
        module = SequenceClassifier(_tiny_bert(len(data.tokenizer)), config.model.optim, 2)
        L.seed_everything(config.seed + 1, verbose=False)  # the resumed run must not rely on this
        qat = QuantizationAwareTraining(make_recipe(config.quant))
        stop = [_StopAfterFirstEpoch()] if stop_after_first_epoch else []
        trainer = _quiet_trainer(
            max_epochs=2,
            limit_val_batches=1,
            default_root_dir=folder,
            callbacks=[
                qat,
                *([RngState()] if rng_state else []),
                ModelCheckpoint(dirpath=folder, save_last=True),
                *stop,
            ],
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        # trainer.test(ckpt_path=...) loads the checkpoint strictly: into the prepared modules, or it raises
        trainer.test(module, datamodule=data, ckpt_path=str(folder / "last.ckpt"), verbose=False)
        return qat

    whole = fit(tmp_path / "whole", stop_after_first_epoch=False)
    fit(tmp_path / "resumed", stop_after_first_epoch=True)
    resumed = fit(tmp_path / "resumed", False, ckpt_path=str(tmp_path / "resumed" / "last.ckpt"))
    expected, got = whole.quantized_model.state_dict(), resumed.quantized_model.state_dict()
    assert expected.keys() == got.keys()
    tensors = [key for key, value in expected.items() if isinstance(value, torch.Tensor)]
    differing = [key for key in tensors if not torch.equal(_plain(expected[key]), _plain(got[key]))]
    assert (differing == []) == rng_state, differing[:3]


def _plain(value: torch.Tensor) -> torch.Tensor:
    """Float values of eager quantized tensors and torchao tensor subclasses, comparable with torch.equal."""
    quantized = value.is_quantized or type(value) not in (torch.Tensor, torch.nn.Parameter)
    return value.dequantize() if quantized else value


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_attention_matmuls_are_fake_quantized_through_eager_attention(make_cfg, tmp_path: Path) -> None:
    overrides = ("quant=qat_x86", "quant.attention_matmuls=true", "attention=eager", "logger=none")
    config = to_config(make_cfg(*FAST, *overrides))
    recipe = make_recipe(config.quant)
    model = recipe.prepare(_tiny_bert().train())
    ids = torch.randint(5, 60, (2, 7))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    quantizers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleDict)]
    assert len(quantizers) == 2 and model.config._attn_implementation == "qat_eager"
    # the observers saw the operands: probabilities lie in [0, 1], queries are signed
    probs, query = (
        quantizers[0]["probs"].activation_post_process,
        quantizers[0]["query"].activation_post_process,
    )
    assert 0 <= probs.min_val <= probs.max_val <= 1 and query.min_val < 0 < query.max_val
    # and the matmuls take the fake-quantized operands: switching only these quantizers off moves the
    # encoder's output (the logits of this random model are too small to outlast the pooler's rounding)
    model.eval()
    recipe.set_phase(model, fake_quant=True, observe=False)

    def encoded() -> torch.Tensor:
        with torch.no_grad():
            return model(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
            ).hidden_states[-1]

    simulated = encoded()
    for attention_quantizers in quantizers:
        attention_quantizers.apply(tq.disable_fake_quant)
    assert not torch.equal(simulated, encoded())
    results = run(config, JobContext(folder=tmp_path, choices={"quant": "qat_x86"}))
    assert results["status"] == "ok"  # trained, converted, reloaded to identical logits


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["attention=sdpa"], "runs a fused kernel; use attention=eager"),
        (["attention=eager", "quant=qat_torchao_int8"], "needs quant.api=eager and quant.method=qat"),
        (["attention=eager", "quant=ptq_static"], "needs quant.api=eager and quant.method=qat"),
    ],
)
def test_attention_matmuls_only_with_eager_attention_and_eager_qat(
    make_cfg, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        to_config(make_cfg("quant=qat_x86", *overrides, "quant.attention_matmuls=true"))


EAGER_QAT = [
    r
    for r in RECIPES
    if r.startswith("qat_")
    and not r.endswith("_lora")  # its prepared model is its base recipe's: LoRA joins in the QAT callback
    and compose_config("config", [f"quant={r}"]).quant.api == "eager"
]


def _ranges_doubled(model: torch.nn.Module) -> None:
    """Observers that moved after the simulation: conversion ships other activation scales."""
    for module in model.modules():
        if isinstance(module, tq.FakeQuantize) and module.scale.numel() == 1:
            observer = module.activation_post_process
            observer.min_val.mul_(2)
            observer.max_val.mul_(2)


@pytest.mark.parametrize(
    ("recipe_name", "broken"),
    [*((name, None) for name in EAGER_QAT), ("qat_x86", "broken_observers_moved_before_conversion")],
)
def test_fake_quantization_predicts_the_int8_model_it_converts_to(
    make_cfg, recipe_name: str, broken: str | None
) -> None:
    """What QAT trains against is what ships: INT8 logits sit on the fake-quant ones, embeddings included.

    Were the embedding table quantized only at conversion, or the int8 kernels' int16 sums to
    saturate (full-range uint8 activations times 8-bit weights without VNNI), the INT8 model
    would drift from its simulation by as much as the simulation drifts from FP32, or more.
    """
    config = to_config(make_cfg(f"quant={recipe_name}"))
    recipe = make_recipe(config.quant)
    torch.manual_seed(0)
    model = recipe.prepare(_tiny_bert().train())
    if config.quant.embeddings == "int8":
        assert isinstance(model.get_input_embeddings(), torch.ao.nn.qat.Embedding)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 60, (32, 24), generator=generator) for _ in range(4)]
    recipe.set_phase(model, fake_quant=True, observe=True)
    with torch.no_grad():
        for ids in batches[:3]:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    model.eval()
    ids = batches[3]

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    recipe.set_phase(model, fake_quant=True, observe=False)
    simulated = logits(model)
    shipped = copy.deepcopy(model)
    if broken:
        _ranges_doubled(shipped)
    int8 = logits(recipe.convert(shipped))
    recipe.set_phase(model, fake_quant=False, observe=False)
    float_logits = logits(model)
    quantization_effect = (simulated - float_logits).abs().mean()
    assert quantization_effect > 0
    # Measured on an AVX2 CPU: 0 for every recipe here; 4.2x the effect with reduce_range=false.
    drift = (int8 - simulated).abs().mean() / quantization_effect
    assert (drift <= 0.1) == (broken is None), f"{float(drift):.3f} x the effect"


@pytest.mark.parametrize("recipe_name", ["ptq_static", "qat_x86_a8w7"])
def test_float_output_linears_compute_exactly_the_simulated_quantization(make_cfg, recipe_name: str) -> None:
    """quant.linear_output=float: each INT8 Linear returns float, so the INT8 model is its QDQ simulation
    (quantized inputs and weights, float outputs) up to float summation order, for PTQ and QAT alike."""
    overrides = (f"quant={recipe_name}", "quant.linear_output=float", "quant.embeddings=float")
    recipe = make_recipe(to_config(make_cfg(*overrides)).quant)
    torch.manual_seed(0)
    model = _tiny_bert()
    with torch.no_grad():  # a fresh BERT's biases are zero: make them count
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(std=0.1)
    model = recipe.prepare(model.train())
    recipe.set_phase(model, fake_quant=True, observe=True)
    ids = torch.randint(0, 60, (16, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)  # observes the batch it is then tested on: no input beyond a range
    recipe.set_phase(model, fake_quant=True, observe=False)
    int8 = recipe.convert(copy.deepcopy(model))
    assert {type(int8.get_submodule(name)) for name in recipe.targets} == {Int8LinearFloatOutput}
    recipe.set_phase(model, fake_quant=False, observe=False)
    with torch.no_grad():
        simulated = recipe.qdq_model(model)(input_ids=ids).logits
        shipped = int8(input_ids=ids).logits
        float_logits = model(input_ids=ids).logits
    quantization_effect = (simulated - float_logits).abs().mean()
    assert quantization_effect > 0
    # Not bit for bit: float sums in another order can move an activation across a rounding
    # boundary. Measured on an AVX2 CPU: 0.007x (PTQ) and 0.006x (QAT) the effect; dropping the
    # biases fails it.
    assert (shipped - simulated).abs().mean() <= 0.03 * quantization_effect


class _Logits(torch.nn.Module):
    """A model whose logits are `value`, plus a jitter that alternates between calls (a kernel
    whose results move between runs, as x86 INT8 did on an AMX CPU after a DDP fit)."""

    def __init__(self, value: float, jitter: float = 0.0) -> None:
        super().__init__()
        self.value, self.jitter, self.calls = value, jitter, 0

    def forward(self, input_ids: torch.Tensor) -> Any:
        self.calls += 1
        return SimpleNamespace(logits=torch.full((1, 2), self.value + self.jitter * (self.calls % 2)))


def test_a_reloaded_artifact_must_match_within_the_models_own_rerun_spread(tmp_path: Path) -> None:
    from qatflash.quant.ship import check_reload

    example = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    # deterministic kernels: exact equality, so the smallest difference is refused
    assert check_reload(_Logits(1.0), _Logits(1.0), example, tmp_path / "a.pt") == 0.0
    with pytest.raises(
        RuntimeError, match=r"differ by 9.5\d*e-07, beyond the model's own run-to-run spread 0"
    ):
        check_reload(_Logits(1.0), _Logits(1.0 + 1e-6), example, tmp_path / "a.pt")
    # kernels that move by 2e-6 between runs: a reload within that passes, a lost scale does not
    spread = check_reload(_Logits(1.0, 2e-6), _Logits(1.0 + 2e-6), example, tmp_path / "a.pt")
    assert spread == pytest.approx(2e-6, rel=0.05)  # 2e-6 as float32 represents it near 1.0
    with pytest.raises(RuntimeError, match="does not reproduce the model's logits"):
        check_reload(_Logits(1.0, 2e-6), _Logits(0.5), example, tmp_path / "a.pt")
