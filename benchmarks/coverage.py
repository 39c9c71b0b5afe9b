"""What each quantization recipe quantizes in each model family, measured by converting it.

For every recipe of `conf/quant/` (FP32 and the refused GPTQ aside) and every model named on the
command line, the model is built from its config with random weights (coverage and size depend on
its shape, not on training), prepared, fed one batch where the recipe observes, converted and
checked (`Recipe.check_converted`), then sized by its saved artifact. The table it prints is
docs/recipe-coverage.md: what the recipe makes (its target, format/device/dtype), quantized of all
weight-matrix modules per type, the share of weight elements quantized, and the artifact's size over
the float model's. A recipe the model cannot take (a kernel's shape rule, a missing extra) gets its
one-line refusal as its row, one whose kernels this machine lacks (FP8 on a CPU) the reason.

    PYTHONPATH=src python benchmarks/coverage.py gpt2_tiny llama_tiny qwen2_tiny
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from qatflash.cli import config_dir
from qatflash.config import to_config
from qatflash.errors import ConfigError
from qatflash.models import build_model_from_config, declared_config
from qatflash.preflight import compose_config
from qatflash.quant import make_recipe
from qatflash.quant.artifact import serialized_bytes
from qatflash.quant.targeting import coverage

RECIPES = sorted(
    p.stem for p in (Path(config_dir()) / "quant").glob("*.yaml") if p.stem not in ("fp32", "gptq")
)


def measure(model_name: str, recipe_name: str, folder: Path) -> str:
    """One table row: what `recipe_name` quantized of `model_name`, or why it refused."""
    try:
        cfg = to_config(
            compose_config(
                "config", ["task=causal_lm", "data=wikitext2", f"model={model_name}", f"quant={recipe_name}"]
            )
        )
        recipe = make_recipe(cfg.quant)
        target = recipe.target()
        if (unreachable := recipe.unshippable()) is not None:
            return f"| {model_name} | `{recipe_name}` | `{target}` | not on this machine: {unreachable} | | |"
        hf_config = declared_config(cfg.model)
        hf_config.use_cache = False
        torch.manual_seed(0)
        model = build_model_from_config(hf_config, cfg.attention, AutoModelForCausalLM)
        prepared = recipe.prepare(copy.deepcopy(model).train())
        if recipe.is_prepared(prepared):
            with torch.no_grad():
                prepared(input_ids=torch.randint(0, hf_config.vocab_size, (2, 64)))
        quantized = recipe.converted(prepared)
        recipe.check_converted(quantized)
    except ConfigError as refusal:
        return f"| {model_name} | `{recipe_name}` | | refused: {refusal} | | |"
    covered = coverage(model, cfg.quant.targets, recipe.selected)
    kinds = ", ".join(
        f"{kind} {row['quantized_modules']}/{row['modules']}" for kind, row in covered["by_type"].items()
    )
    ratio = recipe.save(quantized, folder / recipe.artifact_name) / serialized_bytes(model)
    share = covered["quantized_weight_share"]
    return f"| {model_name} | `{recipe_name}` | `{target}` | {kinds} | {share:.3f} | {ratio:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="+", help="conf/model names (decoders: the recipes are built for causal_lm)"
    )
    args = parser.parse_args()
    print("| model | recipe | target | quantized / modules, by type | quantized weight share | size ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for model_name in args.models:
            for recipe_name in RECIPES:
                print(measure(model_name, recipe_name, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
