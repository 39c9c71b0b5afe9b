"""Tensor files a run writes and reads back: whole or not at all, and loaded without running code.

Every checkpoint, INT8 artifact and shared FP32 fine-tune goes through here. Writing to a
temporary name in the same folder and renaming means a job killed mid-write (kill -9, a lost node)
leaves the previous file or none, never a truncated one. Reading with `weights_only=True` means a
tampered pickle is refused instead of executed; a truncated or corrupt file is refused with its
path and what to do, never a bare unpickling traceback.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from qatflash.errors import UnreadableFileError, first_line
from qatflash.results import atomic_path


def save_atomic(obj: Any, path: Path) -> int:
    """torch.save `obj` to `path` via a temporary name (unique per process); returns its size in bytes."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path.stat().st_size


def load_tensors(path: Path, what: str) -> Any:
    """torch.load with weights_only=True; a corrupt, truncated or code-carrying file -> one clear error."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        # weights_only refuses anything but tensors and plain values: the file would run code.
        reason = first_line(error, with_type=False)
        raise UnreadableFileError(
            f"{what} {path} holds more than tensors and plain values, refused unread "
            f"(weights_only=True): {reason}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        reason = first_line(error, with_type=False)
        raise UnreadableFileError(
            f"{what} {path} is unreadable (truncated or corrupt: {reason}); delete it, or re-run with force=true"
        ) from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic writes and code-free reads (resume and ckpt_path alike)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        save_atomic(checkpoint, Path(path))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> Any:
        return load_tensors(Path(path), "checkpoint")
