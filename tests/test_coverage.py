"""Every quantization API quantizes GPT-2-style Conv1D projections as it does nn.Linear, records
what it covered per module type, and refuses patterns that match what it cannot quantize."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import LM_FAST, recipe_case
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from qatflash.config import TargetsConfig, to_config
from qatflash.errors import ConfigError
from qatflash.models import model_on_meta
from qatflash.quant import make_recipe
from qatflash.quant.ship import check_reload
from qatflash.quant.targeting import as_linear, coverage, linear_targets, replace_module

LAYERS = 3
# Each block's Conv1D projections (attention's fused q/k/v and output, the MLP's two) and its MLP
# input projection, which `_mixed_gpt2` makes an nn.Linear.
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
LINEAR = ("mlp.c_fc",)


def _mixed_gpt2() -> GPT2LMHeadModel:
    """A 3-block GPT-2 (hidden 64, seeded) whose MLP input projections are nn.Linear and the
    rest Conv1D: one model mixing both kinds in every block, beside its Linear LM head."""
    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=LAYERS, n_head=2, n_positions=64, vocab_size=96, use_cache=False
    )
    model = GPT2LMHeadModel(hf_config).eval()
    for block in range(LAYERS):
        name = f"transformer.h.{block}.mlp.c_fc"
        replace_module(model, name, as_linear(model.get_submodule(name)))
    return model


def test_a_conv1d_becomes_the_linear_computing_the_same() -> None:
    conv = Conv1D(48, 16)  # 16 inputs, 48 outputs: weight stored as (in, out)
    linear = as_linear(conv)
    assert linear.weight.shape == (48, 16) and torch.equal(linear.weight, conv.weight.t())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(linear(x), conv(x))


# One case per API in make test (torchao's and pt2e's cases in make test-e2e).
CONV1D_CASES = ("ptq_dynamic", "qat_x86", "wo_packed_int4", "wo_bnb_int8")
CONV1D_RECIPES = (
    "ptq_dynamic", "ptq_static", "qat_x86", "qat_torchao_int8", "qat_pt2e_x86",
    "wo_packed_int8", "wo_packed_int4", "wo_torchao_int8", "wo_bnb_int8", "wo_bnb_nf4",
)  # fmt: skip


@pytest.mark.parametrize("recipe_name", [recipe_case(r, CONV1D_CASES) for r in CONV1D_RECIPES])
def test_every_api_quantizes_conv1d_and_linear_projections_alike(
    make_cfg, tmp_path: Path, recipe_name: str
) -> None:
    """Conv1D and Linear projections of one model all run quantized, the coverage says so per
    type, the output stays near the float model's, and the artifact reloads to identical logits."""
    quant = to_config(make_cfg(f"quant={recipe_name}", "quant.embeddings=float")).quant
    recipe = make_recipe(quant)
    model = _mixed_gpt2()
    ids = torch.randint(0, 96, (2, 24))
    prepared = recipe.prepare(copy.deepcopy(model).train())
    if recipe.is_prepared(prepared):  # observers and fake quantization see data first
        with torch.no_grad():
            prepared(input_ids=ids)
    int8 = recipe.convert(prepared)
    recipe.check_converted(int8)
    assert recipe.count_quantized(int8) == LAYERS * (len(CONV1D) + len(LINEAR)) + 1  # + lm_head
    by_type = coverage(model, quant.targets, recipe.targets)["by_type"]
    assert by_type["Conv1D"]["quantized_modules"] == by_type["Conv1D"]["modules"] == LAYERS * len(CONV1D)
    assert by_type["Linear"]["quantized_modules"] == by_type["Linear"]["modules"] == LAYERS * len(LINEAR) + 1
    # quant.embeddings=float: both tables matched by all_linears' "*" and left float, counted as such
    assert by_type["Embedding"] == {
        **by_type["Embedding"],
        "modules": 2,
        "quantized_modules": 0,
        "matched_float": 2,
    }
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, int8(input_ids=ids).logits
    # Quantization moves logits by a few percent of their spread; a transposed or lost weight by all of it.
    assert float((got - expected).norm() / expected.norm()) < 0.2
    path = tmp_path / recipe.artifact_name
    recipe.save(int8, path)
    check_reload(int8, recipe.load(path, _mixed_gpt2), {"input_ids": ids}, path)  # raises unless equal


# Each family's block projections (3 blocks) and which of them are its FFN.
FAMILIES = {
    "bert": ("bert.encoder.layer.{}.", ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"), ("intermediate.dense", "output.dense")),
    "llama": ("model.layers.{}.", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "gpt2": ("transformer.h.{}.", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
}  # fmt: skip
# The Linear outside the blocks that all_linears takes (classifiers are excluded by name).
HEADS = {"bert": "bert.pooler.dense", "llama": "lm_head", "gpt2": "lm_head"}


def _meta_model(family: str) -> nn.Module:
    """The family's 3-block model on the meta device: its names and types, no weights."""
    layers = {"n_layer" if family == "gpt2" else "num_hidden_layers": LAYERS}
    hf_config = AutoConfig.for_model(family, num_labels=2, **layers)
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return model_on_meta(hf_config, auto)


def _expected(family: str, preset: str) -> set[str]:
    prefix, block, ffn = FAMILIES[family]
    blocks = [1] if preset == "inner_blocks" else range(LAYERS)
    names = {prefix.format(b) + n for b in blocks for n in (ffn if preset == "ffn" else block)}
    return names | {HEADS[family]} if preset == "all_linears" else names


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("preset", ["all_linears", "encoder", "ffn", "inner_blocks"])
def test_target_presets_select_exactly_their_modules_in_each_family(
    make_cfg, family: str, preset: str
) -> None:
    targets = to_config(make_cfg("quant=qat_x86", f"quant/targets={preset}")).quant.targets
    assert set(linear_targets(_meta_model(family), targets)) == _expected(family, preset)


class ScaledLinear(nn.Linear):
    """A projection type no recipe quantizes (torch.ao eager maps nn.Linear by exact type)."""


def test_patterns_matching_a_module_no_recipe_quantizes_are_refused_with_counts() -> None:
    model = _mixed_gpt2()
    for block in range(2):
        linear = model.get_submodule(f"transformer.h.{block}.mlp.c_fc")
        scaled = ScaledLinear(linear.in_features, linear.out_features)
        replace_module(model, f"transformer.h.{block}.mlp.c_fc", scaled)
    with pytest.raises(ConfigError, match=r"matches modules no recipe can quantize: \{'ScaledLinear': 2\}"):
        linear_targets(model, TargetsConfig(include=["*"]))
    # Left out by name, the rest is selected (and the subclass stays as it was).
    chosen = linear_targets(model, TargetsConfig(include=["*"], exclude=["*.h.[01].mlp.c_fc"]))
    assert len(chosen) == LAYERS * 4 + 1 - 2


# gpt2_tiny shrunk: 3 blocks of 128, a 512-token BPE, 128 positions (a few seconds to train).
GPT2_SMALL = [
    "model=gpt2_tiny",
    "model.arch.n_embd=128",
    "model.arch.n_layer=3",
    "model.arch.n_head=2",
    "model.arch.vocab_size=512",
    "model.arch.n_positions=128",
]


@pytest.mark.parametrize("recipe", ["qat_x86", pytest.param("ptq_dynamic", marks=pytest.mark.e2e)])
def test_a_gpt2_from_the_cli_runs_every_projection_quantized(
    run_app, text_corpus: Path, hf_cache: Path, tmp_path: Path, recipe: str
) -> None:
    """The GPT-2 case as a user runs it: its Conv1D projections all quantized, the record says so
    per type, and the INT8 model is a third of the float one (the job itself proves the reload)."""
    code, stderr = run_app(
        *LM_FAST,
        *GPT2_SMALL,
        f"data.path={text_corpus}",
        f"data.cache_dir={hf_cache}",
        f"quant={recipe}",
        "trainer.max_steps=6",
        "benchmark=none",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 0, stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "ok"
    model = results["model"]
    conv1d = model["coverage"]["by_type"]["Conv1D"]
    assert conv1d["quantized_modules"] == conv1d["modules"] == 3 * 4
    assert conv1d["quantized_weights"] / conv1d["weights"] >= 0.95
    assert model["coverage"]["by_type"]["Linear"]["quantized_modules"] == 1  # the tied LM head
    assert model["quantized_modules"] == 3 * 4 + 1 + 1  # + the token embedding table
    assert results["metrics"]["model/size_ratio"] <= 0.35


def test_a_recipe_that_leaves_a_target_float_is_refused(make_cfg) -> None:
    """As torchao's Int4WeightOnlyConfig does with a Linear its group does not divide: the count of
    quantized modules must equal the selection, or the job fails rather than record a half."""
    recipe = make_recipe(to_config(make_cfg("quant=ptq_dynamic", "quant.embeddings=float")).quant)
    int8 = recipe.convert(recipe.prepare(_mixed_gpt2()))
    recipe.check_converted(int8)
    replace_module(int8, "transformer.h.1.attn.c_proj", nn.Linear(64, 64))
    with pytest.raises(
        RuntimeError, match=r"converted 12 modules to quantized ones, but selected 13 \(13 Linear"
    ):
        recipe.check_converted(int8)
