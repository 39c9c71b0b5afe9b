"""A finished training run as a benchmark subject: `qatflash-bench bench.artifact=<run dir>`.

A run folder holds what rebuilds its quantized model without retraining: the model's HF config
(`model_config.json`), the run's config (`.hydra/config.yaml`: which quantization recipe), and the
quantized artifact that the recipe loads (a state_dict read with `weights_only=True`, or an exported
program). The skeleton takes the benchmark's `attention`, so one quantized model can be timed under
each implementation (a pt2e program keeps the attention it was exported with). Everything is
checked when the folder is opened, before any point runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from qatflash.config import AttentionConfig, QuantConfig
from qatflash.errors import ConfigError
from qatflash.models import build_model_from_config
from qatflash.quant.recipe import Recipe
from qatflash.results import MODEL_CONFIG_FILE, read_results


@dataclass(frozen=True)
class SavedRun:
    folder: Path
    quant: QuantConfig
    artifact: Path

    def hf_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.folder / MODEL_CONFIG_FILE)

    def load_quantized(self, recipe: Recipe, attention: AttentionConfig) -> nn.Module:
        """The run's quantized model on the CPU, rebuilt by `recipe` (made from `self.quant`)."""
        hf_config = self.hf_config()
        return recipe.load(self.artifact, lambda: build_model_from_config(hf_config, attention))


def open_run(folder: str) -> SavedRun:
    """The run in `folder`, or a one-line ConfigError saying what is missing."""
    path = Path(folder)
    results = read_results(path) if path.is_dir() else None
    if results is None:
        raise ConfigError(f"bench.artifact={folder} is not a run folder with a readable results.json")
    if results.get("status") != "ok":
        raise ConfigError(f"bench.artifact={folder}: that run's status is {results.get('status')!r}, not ok")
    name = (results.get("model") or {}).get("artifact")
    if not name or not (path / name).is_file():
        raise ConfigError(
            f"bench.artifact={folder} holds no quantized artifact (quant=fp32 runs save none; "
            "quantized runs save quantized_model.pt or quantized_model.pt2, before results schema 2 int8_model.*)"
        )
    saved = path / ".hydra" / "config.yaml"
    if not saved.is_file() or not (path / MODEL_CONFIG_FILE).is_file():
        raise ConfigError(f"bench.artifact={folder} lacks .hydra/config.yaml or {MODEL_CONFIG_FILE}")
    cfg = OmegaConf.load(saved)
    quant = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantConfig), cfg.quant))
    return SavedRun(path, quant, path / name)  # type: ignore[arg-type]
