"""Quantization: every recipe end to end on tiny_bert, observer scheduling, targeting and refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.ao import quantization as tq
from torch.ao.nn import quantized as nnq
from transformers import AutoConfig

from qatflash.bench.onnx import OrtModel, export_onnx
from qatflash.callbacks import RngState
from qatflash.cli import config_dir
from qatflash.config import AttentionConfig, ConfigError, TargetsConfig, to_config
from qatflash.data import TextClassificationData
from qatflash.models import build_model_from_config, load_tokenizer
from qatflash.module import SequenceClassifier
from qatflash.pipeline import JobContext, run
from qatflash.quant import QuantizationAwareTraining, make_recipe
from qatflash.quant.eager import check_engine
from qatflash.quant.float_output import Int8LinearFloatOutput
from qatflash.quant.targeting import linear_targets

RECIPES = sorted(p.stem for p in (Path(config_dir()) / "quant").glob("*.yaml") if p.stem != "fp32")
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


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_converts_evaluates_and_reloads(make_cfg, tmp_path: Path, recipe: str) -> None:
    config = to_config(make_cfg(*FAST, "logger=none", f"quant={recipe}", "quant.calibration_batches=2"))
    results = run(config, JobContext(folder=tmp_path, choices={"quant": recipe}))
    assert results["status"] == "ok"
    metrics, model = results["metrics"], results["model"]
    assert 0 <= metrics["test/acc_int8"] <= 1 and metrics["test/acc"] == metrics["test/acc_int8"]
    reference = "test/acc_fakequant" if config.quant.method == "qat" else "test/acc_fp32"
    assert 0 <= metrics[reference] <= 1
    # all_linears: 2 blocks x (q, k, v, attention out, intermediate, output) + pooler; ffn: 2 x 2.
    # Plus the token-embedding table.
    linears = len(linear_targets(_tiny_bert(), config.quant.targets))
    assert linears == (4 if recipe.endswith("_ffn") else 13)
    assert model["quantized_modules"] == linears + (config.quant.embeddings == "int8")
    assert (tmp_path / model["int8_artifact"]).stat().st_size == model["int8_bytes"]
    if config.quant.api != "pt2e":  # a .pt2 archive also holds the program: larger than tiny_bert's weights
        assert model["int8_bytes"] < model["fp32_bytes"]
    int8_backend = "torch_compile" if config.quant.api == "pt2e" else "torch"  # pt2e INT8 runs compiled
    rows = {(row["variant"], row["backend"]): row for row in results["latency"]}
    assert set(rows) == {("fp32", "torch"), ("int8", int8_backend)}
    # INT8 and FP32 were timed in alternating rounds; the ratio pairs each round's blocks.
    int8 = rows["int8", int8_backend]
    assert int8["ratio_reference"] == "fp32/torch" and int8["rounds_to_fp32"] >= 1
    assert int8["ratio_p10_to_fp32"] <= int8["ratio_to_fp32"] <= int8["ratio_p90_to_fp32"]
    assert "ratio_to_fp32" not in rows["fp32", "torch"]


@pytest.mark.parametrize("recipe", ["ptq_dynamic", "qat_x86"])
def test_onnxruntime_rows_beside_torch_with_accuracy_and_size(make_cfg, tmp_path: Path, recipe: str) -> None:
    config = to_config(
        make_cfg(*FAST, "logger=none", f"quant={recipe}", "benchmark.backends=[torch,onnxruntime]")
    )
    results = run(config, JobContext(folder=tmp_path, choices={"quant": recipe}))
    rows = {(row["variant"], row["backend"]): row for row in results["latency"]}
    # ORT's dynamic INT8 of the FP32 export is every run's baseline; QAT adds its own INT8 as QDQ.
    ort_variants = ("fp32", "int8", "int8_qdq") if recipe == "qat_x86" else ("fp32", "int8")
    assert set(rows) == {("fp32", "torch"), ("int8", "torch")} | {(v, "onnxruntime") for v in ort_variants}
    assert rows["fp32", "onnxruntime"]["precision"] == "32-true" and rows["int8", "onnxruntime"]["p50_ms"] > 0
    metrics, model = results["metrics"], results["model"]
    assert model["onnx_int8_bytes"] < model["onnx_fp32_bytes"]
    assert (tmp_path / "model_int8_ort.onnx").stat().st_size == model["onnx_int8_bytes"]
    if recipe == "ptq_dynamic":
        # The FP32 export predicts what the torch model predicts.
        assert metrics["test/acc_ort_fp32"] == metrics["test/acc_fp32"]
        assert 0 <= metrics["test/acc_ort_int8"] <= 1
        assert "per call" in model["onnx_int8_qdq_skipped"] and "onnx_int8_qdq_bytes" not in model
    else:
        # The QDQ graph carries the QAT model's own scales: it predicts what the torch.ao INT8 model does.
        assert abs(metrics["test/acc_ort_int8_qdq"] - metrics["test/acc_int8"]) <= 2 / 128
        # QAT's FP32 twin is the model before fine-tuning, kept for size and latency: never scored.
        assert "test/acc_ort_fp32" not in metrics and "test/acc_ort_int8" not in metrics
        assert (tmp_path / "model_int8_qdq.onnx").stat().st_size == model["onnx_int8_qdq_bytes"]
        assert model["onnx_int8_qdq_bytes"] < model["onnx_fp32_bytes"]


@pytest.mark.parametrize(
    "recipe_name", ["qat_x86", "qat_per_tensor", "qat_x86_a8w7_float_out", "ptq_static", "qat_pt2e_x86"]
)
def test_qdq_form_runs_the_recipes_own_quantization_in_onnxruntime(
    make_cfg, tmp_path: Path, recipe_name: str
) -> None:
    import onnx

    recipe = make_recipe(to_config(make_cfg(f"quant={recipe_name}")).quant)
    torch.manual_seed(0)  # the same weights whichever tests ran before
    model = recipe.prepare(_tiny_bert().train())
    recipe.set_phase(model, fake_quant=True, observe=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (8, 24), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids).index_fill_(1, torch.arange(12, 24), 0)}
    with torch.no_grad():
        for _ in range(3):
            model(**batch)
    recipe.set_phase(model, fake_quant=True, observe=False)
    int8 = recipe.convert(copy.deepcopy(model))
    qdq = recipe.qdq_model(model)
    path = tmp_path / "qdq.onnx"
    export_onnx(qdq, path, batch, max_len=512)

    graph = onnx.load(path).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    ops = [node.op_type for node in graph.node]
    # Each targeted Linear's weight is stored int8 behind a DequantizeLinear; activations are quantized.
    assert len(int8_weights) >= len(recipe.targets) and ops.count("DequantizeLinear") >= len(recipe.targets)
    assert "QuantizeLinear" in ops
    with torch.inference_mode():
        expected, in_torch = int8(**batch).logits, qdq(**batch).logits
        in_ort = OrtModel(path, threads=1)(**batch).logits
    # Different kernels round requantized activations differently: within a few quantization steps,
    # against logits that are all wrong if a scale, zero point or weight were lost.
    tolerance = 0.15 * expected.abs().max()
    assert (in_torch - expected).abs().max() <= tolerance
    assert (in_ort - in_torch).abs().max() <= tolerance


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (
            "all_linears",
            {
                "pooler.dense",
                "bert.encoder.layer.0.attention.self.query",
                "bert.encoder.layer.1.output.dense",
            },
        ),
        ("encoder", {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.intermediate.dense"}),
        ("ffn", {"bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"}),
    ],
)
def test_target_presets_select_modules_by_name(make_cfg, targets: str, expected: set[str]) -> None:
    config = to_config(make_cfg("quant=qat_x86", f"quant/targets={targets}"))
    chosen = set(linear_targets(_tiny_bert(), config.quant.targets))
    assert {e.replace("pooler", "bert.pooler") for e in expected} <= chosen
    assert "classifier" not in chosen
    if targets == "ffn":
        assert not any("attention" in name for name in chosen)
    if targets == "encoder":
        assert "bert.pooler.dense" not in chosen


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
        ("quant.freeze_observers_step=0", "must come after quant.fake_quant_start_step=0"),
        ("quant.weight.observer=minmax", "needs a per-channel observer"),
        ("quant.activation.quant_min=300", "quant range [300, 255] is empty"),
        ("quant.embeddings=int4", "quant.embeddings='int4' is not allowed"),
    ],
)
def test_bad_quant_values_are_refused(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_config(make_cfg("quant=qat_x86", override))
    assert message in str(info.value)


def _data(config) -> TextClassificationData:
    data = TextClassificationData(config.data, lambda texts: load_tokenizer(config.model, texts), config.seed)
    data.setup()
    return data


def _quiet_trainer(**kwargs) -> L.Trainer:
    """A Trainer with no logger, progress bar or model summary: tests read callbacks and results."""
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _scales(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.scale.clone() for m in model.modules() if isinstance(m, tq.FakeQuantize)]


def test_observers_move_only_in_training_steps_and_stop_at_the_freeze_step(make_cfg) -> None:
    """Sanity checks and validation never move a scale; after freeze_observers_step, training does not either."""
    config = to_config(make_cfg(*FAST, "quant=qat_x86", "data.batch_size=16"))
    data = _data(config)
    module = SequenceClassifier(_tiny_bert(len(data.tokenizer)), config.model.optim, 2)
    callback = QuantizationAwareTraining(
        make_recipe(config.quant), fake_quant_start_step=2, freeze_observers_step=6
    )
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
        callbacks=[callback, Watch()],
    )
    trainer.fit(module, datamodule=data)

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert same(before_step[0], before_step[2]), "observers moved before fake_quant_start_step"
    assert not same(before_step[2], before_step[4]), "observers did not move while training"
    assert same(before_step[6], before_step[9]), "observers moved after freeze_observers_step"
    assert len(validations) >= 3  # sanity check + validations at steps 4 and 8
    for start, end in validations:
        assert same(start, end), "a validation pass moved the observers"
    assert callback.int8_model is not None


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


def test_inner_blocks_preset_leaves_out_the_first_and_last_block(make_cfg) -> None:
    hf_config = AutoConfig.for_model("bert", num_labels=2, **{**TINY, "num_hidden_layers": 4})
    model = build_model_from_config(hf_config, AttentionConfig(implementation="sdpa"))
    config = to_config(make_cfg("quant=qat_x86", "quant/targets=inner_blocks"))
    blocks = {name.split(".")[3] for name in linear_targets(model, config.quant.targets)}
    assert blocks == {"1", "2"}


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


@pytest.mark.parametrize("recipe_name", ["qat_x86", "qat_torchao_int8"])
def test_resuming_mid_qat_reproduces_the_int8_model(make_cfg, tmp_path: Path, recipe_name: str) -> None:
    """Stop after epoch 1 of 2, resume from the checkpoint: same INT8 weights and scales as one run."""
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
            callbacks=[qat, RngState(), ModelCheckpoint(dirpath=folder, save_last=True), *stop],
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        test = trainer.test(module, datamodule=data, ckpt_path=str(folder / "last.ckpt"), verbose=False)
        assert 0 <= test[0]["test/acc"] <= 1  # trainer.test(ckpt_path=...) loads into the prepared model
        return qat

    whole = fit(tmp_path / "whole", stop_after_first_epoch=False)
    fit(tmp_path / "resumed", stop_after_first_epoch=True)
    resumed = fit(tmp_path / "resumed", False, ckpt_path=str(tmp_path / "resumed" / "last.ckpt"))
    expected, got = whole.int8_model.state_dict(), resumed.int8_model.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(_plain(value), _plain(got[key])), key


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


EAGER_QAT = [r for r in RECIPES if r.startswith("qat_") and not r.startswith(("qat_torchao", "qat_pt2e"))]


@pytest.mark.parametrize("recipe_name", EAGER_QAT)
def test_fake_quantization_predicts_the_int8_model_it_converts_to(make_cfg, recipe_name: str) -> None:
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
    int8 = logits(recipe.convert(copy.deepcopy(model)))
    recipe.set_phase(model, fake_quant=False, observe=False)
    float_logits = logits(model)
    quantization_effect = (simulated - float_logits).abs().mean()
    assert quantization_effect > 0
    # Measured on an AVX2 CPU: 0 for every recipe here; 4.2x the effect with reduce_range=false.
    assert (int8 - simulated).abs().mean() <= 0.1 * quantization_effect


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
