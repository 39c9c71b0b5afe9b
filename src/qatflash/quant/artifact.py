"""INT8 artifacts: a state_dict saved atomically, loaded with weights_only=True into a rebuilt skeleton.

weights_only loading executes no code from the file (a tampered pickle is refused, see
qatflash.storage), and rebuilding the skeleton with the same recipe is what makes packed INT8
parameters loadable at all.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qatflash.storage import load_tensors, save_atomic


def save_state(model: nn.Module, path: Path) -> int:
    """Write the state_dict to `path` via a temporary file; returns its size in bytes."""
    return save_atomic(model.state_dict(), path)


def serialized_bytes(model: nn.Module) -> int:
    """What `save_state` would write, without writing it (the FP32 size beside the INT8 artifact)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def load_state(skeleton: Callable[[], nn.Module], path: Path) -> nn.Module:
    model = skeleton()
    # assign: torchao's INT8 weights are tensor subclasses that must replace, not fill, the skeleton's.
    model.load_state_dict(load_tensors(path, "INT8 artifact"), assign=True)
    return model.eval()
