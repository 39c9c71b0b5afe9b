"""One FP32 fine-tune shared by every point of a sweep that starts from it.

FP32, dynamic-PTQ and static-PTQ points differ only after training, so training the same model on
the same data three times is pure overhead. The fine-tuned weights are keyed by the config sections
that decide them (task, model, data, attention, trainer, seed) and kept beside the sweep's points, in
`<sweep>/.fp32_models/<key>/`: the first point trains and saves, the others load. Only sweeps share
(a single run always trains), and QAT points train their own model (fake quantization changes the
training itself).

The weights go through qatflash.storage (atomic write, weights_only read), and the metrics file
is written last, so a killed writer leaves no cache entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from qatflash.config import Config
from qatflash.results import write_json_atomic
from qatflash.storage import load_tensors, save_atomic

# The sections of the resolved config that decide the fine-tuned weights.
KEY_SECTIONS = ("task", "model", "data", "attention", "trainer", "seed")
CACHE_FOLDER = ".fp32_models"


class FinetuneCache:
    """One entry: a folder holding the fine-tuned weights (`WEIGHTS`) and, written last, their
    validation metrics (`METRICS`)."""

    WEIGHTS = "model.pt"
    METRICS = "val_metrics.json"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, sweep_dir: Path, cfg: Config) -> FinetuneCache:
        """The entry of `cfg`'s fine-tune among the sweep's."""
        relevant = {k: getattr(cfg, k) for k in KEY_SECTIONS}
        relevant = {k: asdict(v) if k != "seed" else v for k, v in relevant.items()}
        key = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cls(sweep_dir / CACHE_FOLDER / key)

    @property
    def _weights(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def _metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def complete(self) -> bool:
        return self._weights.is_file() and self._metrics.is_file()

    def load(self, model: nn.Module) -> dict[str, float] | None:
        """Fill `model` with the cached fine-tune and return its validation metrics; None if absent."""
        if not self.complete:
            return None
        model.load_state_dict(load_tensors(self._weights, "shared FP32 fine-tune"))
        return json.loads(self._metrics.read_text())

    def save(self, model: nn.Module, val_metrics: dict[str, float]) -> None:
        save_atomic(model.state_dict(), self._weights)
        write_json_atomic(self._metrics, val_metrics)  # written last: its presence means complete
