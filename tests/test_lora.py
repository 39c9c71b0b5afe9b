"""QAT with LoRA (`quant.lora`): adapters train beside a frozen fake-quantized base, are merged into it
before conversion, and the converted model is the merged float model quantized."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torchao.quantization as ao
from conftest import FAST
from test_quant import _data, _quiet_trainer, _tiny_bert
from transformers import AutoConfig, AutoModelForCausalLM

from qatflash.config import AttentionConfig, to_config
from qatflash.errors import ConfigError
from qatflash.models import build_model_from_config
from qatflash.pipeline import preflight
from qatflash.quant import make_recipe
from qatflash.quant.callback import QuantizationAwareTraining
from qatflash.quant.lora import add_adapters
from qatflash.tasks import TASKS

pytestmark = pytest.mark.needs("lora")
RANK, ALPHA, LORA_LR = 4, 8.0, 3e-3


def _fit(make_cfg, recipe_name: str, *overrides: str) -> dict[str, Any]:
    """tiny_bert's QAT with rank-4 adapters for 6 steps; its parameters before, at the end of
    training (adapters not yet merged) and after the fit, and the converted model."""
    config = to_config(
        make_cfg(
            *FAST,
            f"quant={recipe_name}",
            f"quant.lora.r={RANK}",
            f"quant.lora.alpha={ALPHA}",
            f"quant.lora.lr={LORA_LR}",
            "data.batch_size=16",
            *overrides,
        )
    )
    data = _data(config)
    module = TASKS.load("classification")(config).lightning_module(_tiny_bert(len(data.tokenizer)), data)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    callback = QuantizationAwareTraining(
        make_recipe(config.quant), freeze_observers_step=config.quant.freeze_observers_step
    )
    trained: dict[str, Any] = {}

    class Watch(L.Callback):  # training's end comes before the fit's, where the adapters merge
        def on_train_end(self, trainer, pl_module) -> None:
            model = pl_module.model
            trained["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
            trained["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            trained["rates"] = {g["initial_lr"] for g in trainer.optimizers[0].param_groups}

    trainer = _quiet_trainer(
        max_steps=6, limit_val_batches=0, enable_checkpointing=False, callbacks=[callback, Watch()]
    )
    trainer.fit(module, datamodule=data)
    return {"before": before, **trained, "model": module.model, "callback": callback}


def _quantized_as_shipped(recipe: Any, weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantized by hand (eager: per-channel symmetric int8, its scale from its own range)
    or by torchao's convert config on a plain Linear holding it (torchao); as integers."""
    if recipe.cfg.api == "eager":
        scale = weight.abs().amax(dim=1) / 127.5
        zeros = torch.zeros(len(scale), dtype=torch.long)
        return torch.quantize_per_channel(weight, scale.double(), zeros, 0, torch.qint8).int_repr()
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    ao.quantize_(torch.nn.Sequential(linear), recipe.convert_config)
    return linear.weight.qdata


def _integers(linear: torch.nn.Module) -> torch.Tensor:
    weight = linear.weight
    return weight().int_repr() if callable(weight) else weight.qdata


# eager's observers frozen before the end: the merged weights' ranges must still be observed afresh.
@pytest.mark.parametrize(
    ("recipe_name", "overrides"),
    [
        ("qat_x86_lora", ["quant.freeze_observers_step=2"]),
        pytest.param("qat_torchao_8da4w_lora", [], marks=pytest.mark.e2e),  # make test keeps one API
    ],
    ids=["eager", "torchao"],
)
def test_adapters_train_on_a_frozen_base_and_are_merged_into_what_ships(
    make_cfg, recipe_name: str, overrides: list[str]
) -> None:
    fit = _fit(make_cfg, recipe_name, *overrides)
    before, params, recipe = fit["before"], fit["params"], fit["callback"].recipe
    targets = recipe.targets
    assert len(targets) == 13  # tiny_bert's all_linears
    wrapped = {t: recipe.prepared_linear(t) for t in targets}
    adapters = {f"{wrapped[t]}.lora_{ab}.default.weight" for t in targets for ab in "AB"}
    # Only the adapters and the float head (the classifier, which no recipe quantizes) train.
    assert fit["trainable"] == adapters | {"classifier.weight", "classifier.bias"}
    assert fit["callback"].trainable_parameters == sum(params[n].numel() for n in fit["trainable"])
    assert fit["rates"] == {LORA_LR}  # quant.lora.lr, not model.optim.lr
    assert not torch.equal(params["classifier.weight"], before["classifier.weight"])
    merged = {}
    for target in targets:
        base = params[f"{wrapped[target]}.base_layer.weight"]
        assert torch.equal(base, before[f"{target}.weight"]), f"{target}: the base weight trained"
        a, b = (params[f"{wrapped[target]}.lora_{ab}.default.weight"] for ab in "AB")
        assert b.abs().sum() > 0, f"{target}: B stayed at its zero initialisation"
        merged[target] = base + (ALPHA / RANK) * b @ a
    from peft.tuners.lora import LoraLayer

    model = fit["model"]
    assert not any(isinstance(m, LoraLayer) for m in model.modules()), "merged at the fit's end"
    converted = fit["callback"].quantized_model
    for target in targets:
        torch.testing.assert_close(model.get_submodule(wrapped[target]).weight, merged[target])
        # The converted Linear is the merged weight quantized, with scales from the merged weight's
        # own range, not from the base weight the observers watched.
        shipped = _integers(converted.get_submodule(wrapped[target]))
        assert torch.equal(shipped, _quantized_as_shipped(recipe, merged[target])), target


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant.method=ptq_static"], r"quant.lora needs quant.method=qat .*, not ptq_static"),
        (["quant.api=pt2e", "quant.embeddings=float"], r"quant.lora: quant.api=pt2e .* no module tree"),
        (["quant.range_lr=1e-5", "quant.freeze_observers_step=2"], r"quant.lora with quant.range_lr"),
        (["quant.lora.r=0"], r"quant.lora.r=0 must be > 0"),
        (["quant.lora.alpha=0"], r"quant.lora.alpha=0.0 must be > 0"),
        (["trainer.strategy=ddp_spawn"], r"trainer.strategy=ddp_spawn with quant.lora: its workers merge"),
        (["quant.lora.dropout=1.0"], r"quant.lora.dropout=1.0 must be in \[0, 1\)"),
        (["quant.lora.lr=0"], r"quant.lora.lr=0.0 must be > 0 \(or null\)"),
    ],
)
def test_lora_is_refused_where_it_cannot_apply(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_config(make_cfg("quant=qat_x86_lora", *overrides))


def test_a_tied_lm_head_stays_frozen_with_the_embeddings(make_cfg) -> None:
    """A language model's head that is its input embeddings (tied) is no float head to train: it
    stays frozen, or the embedding table would train through it."""
    hf_config = AutoConfig.for_model(
        "llama",
        tie_word_embeddings=True,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=60,
    )
    model = build_model_from_config(hf_config, AttentionConfig(implementation="sdpa"), AutoModelForCausalLM)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    recipe = make_recipe(
        to_config(
            make_cfg("quant=qat_x86_lora", "quant.embeddings=float", "quant.targets.exclude=[lm_head]")
        ).quant
    )
    prepared = recipe.prepare(model.train())
    assert type(prepared.lm_head) is torch.nn.Linear  # left float
    add_adapters(prepared, [recipe.prepared_linear(t) for t in recipe.targets], recipe.cfg.lora)
    trainable = {n.split(".lora_")[0] for n, p in prepared.named_parameters() if p.requires_grad}
    assert trainable == {recipe.prepared_linear(t) for t in recipe.targets}  # the adapters alone


def test_lora_is_refused_for_a_model_trained_from_scratch(make_cfg) -> None:
    """Adapters beside a frozen, randomly initialised base learn nothing: refused before any data."""
    config = to_config(make_cfg("quant=qat_x86_lora"))  # the default model: tiny_bert from its config
    assert config.model.name_or_path is None
    with pytest.raises(ConfigError, match=r"quant.lora needs a pretrained model \(model.name_or_path\)"):
        preflight(config, TASKS.load("classification")(config), probe_kernel=False)


def test_lora_without_peft_is_refused_in_one_line(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft is an optional extra: its absence is named, with the install command, before any data."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a)
    )
    config = to_config(make_cfg("quant=qat_x86_lora"))
    with pytest.raises(
        ConfigError, match=r"quant.lora needs peft, which is not installed: pip install 'qatflash\[lora\]'"
    ):
        preflight(config, TASKS.load("classification")(config), probe_kernel=False)
