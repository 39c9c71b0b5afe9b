"""Callbacks that any run may carry, whatever its quantization."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class FitStart(L.Callback):
    """The optimizer step a fit starts from, once any checkpoint is restored: where a resumed job
    took up its training (results.json's `resumed_from.global_step`), rather than that it claimed to."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


class RngState(L.Callback):
    """Save the random number generators in every checkpoint and restore them on resume.

    Lightning checkpoints weights, optimizer, scheduler and loop progress but not the RNGs that
    drive dropout, so a resumed run would draw different dropout masks from the uninterrupted
    one. With these states restored (and samplers seeded per epoch), resuming at an epoch
    boundary continues the same trajectory bit for bit on the same device.
    """

    def state_dict(self) -> dict[str, Any]:
        # numpy's state travels as plain values and a tensor: checkpoints load with weights_only=True.
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "gauss": (has_gauss, gauss),
        }
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        numpy = state_dict["numpy"]
        keys = numpy["keys"].numpy().astype(np.uint32)
        np.random.set_state((numpy["kind"], keys, numpy["pos"], *numpy["gauss"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
