"""Quantization: every recipe end to end on tiny_bert, observer scheduling, targeting and refusals."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST
from torch.ao import quantization as tq
from torch.ao.nn import quantized as nnq
from transformers import AutoConfig

from qatflash.cli import config_dir
from qatflash.config import AttentionConfig, ConfigError, TargetsConfig, to_config
from qatflash.data import TextClassificationData
from qatflash.models import build_model_from_config, load_tokenizer
from qatflash.module import SequenceClassifier
from qatflash.pipeline import JobContext, run
from qatflash.quant import EagerRecipe, QuantizationAwareTraining
from qatflash.quant.eager import check_engine
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
    # 2 blocks x (q, k, v, attention out, intermediate, output) + pooler, and the token-embedding table
    assert model["quantized_modules"] == 14
    assert (tmp_path / model["int8_artifact"]).stat().st_size == model["int8_bytes"] < model["fp32_bytes"]
    assert {row["variant"] for row in results["latency"]} == {"fp32", "int8"}


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
    recipe = EagerRecipe(config.quant)
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


def _scales(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.scale.clone() for m in model.modules() if isinstance(m, tq.FakeQuantize)]


def test_observers_move_only_in_training_steps_and_stop_at_the_freeze_step(make_cfg) -> None:
    """Sanity checks and validation never move a scale; after freeze_observers_step, training does not either."""
    config = to_config(make_cfg(*FAST, "quant=qat_x86", "data.batch_size=16"))
    data = TextClassificationData(config.data, lambda texts: load_tokenizer(config.model, texts), config.seed)
    data.setup()
    module = SequenceClassifier(_tiny_bert(len(data.tokenizer)), config.model.optim, 2)
    callback = QuantizationAwareTraining(
        EagerRecipe(config.quant), fake_quant_start_step=2, freeze_observers_step=6
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

    trainer = L.Trainer(
        max_steps=10,
        val_check_interval=4,
        limit_val_batches=2,
        num_sanity_val_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
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
