"""Attention implementations: what each needs, checked before training, and SDPA kernel forcing.

An implementation is data (`conf/attention/*.yaml`): the name transformers knows plus what it needs
(CUDA, half precision, an importable package). Checks here are facts about this device and this
model class, so they run after config validation and before the first batch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qatflash import config
from qatflash.config import HALF_PRECISIONS, PRECISIONS, AttentionConfig, TimingConfig
from qatflash.errors import ConfigError

SDPA_KERNELS: dict[str, SDPBackend] = {
    name: getattr(SDPBackend, member) for name, member in config.SDPA_KERNELS.items()
}

# transformers' class flag for each implementation that needs model support.
_SUPPORT_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


@dataclass(frozen=True)
class TrainingCall:
    """How a training forward calls SDPA: with the model's attention dropout (named by its config key)."""

    dropout_key: str
    dropout: float


def check_attention(
    cfg: AttentionConfig,
    precision: str,
    device: torch.device,
    training: TrainingCall | None = None,
    probe_kernel: bool = True,
) -> None:
    """Refuse, in one line each, an implementation or forced kernel this run cannot use.

    `training` describes the training forwards a job will run; None for a job that only infers
    (`qatflash-bench`). A forced kernel is tried on the device itself (`probe_kernel`): the one
    check here that needs the device, left out by a dry run whose CUDA is faked.
    """
    name = cfg.implementation
    if cfg.requires_module and importlib.util.find_spec(cfg.requires_module) is None:
        hint = f"; {cfg.install_hint}" if cfg.install_hint else ""
        raise ConfigError(
            f"attention={name} needs the Python package '{cfg.requires_module}', which is not installed"
            f"{hint}; or use attention=sdpa"
        )
    if cfg.requires_cuda and device.type != "cuda":
        raise ConfigError(
            f"attention={name} needs a CUDA GPU, but this run is on {device.type}; "
            "use attention=sdpa or attention=eager"
        )
    if cfg.requires_half_precision and precision not in HALF_PRECISIONS:
        raise ConfigError(
            f"attention={name} needs fp16/bf16, but trainer.precision={precision}; "
            f"use one of {list(HALF_PRECISIONS)}"
        )
    if cfg.sdpa_backend is not None and probe_kernel:
        _check_forced_kernel(cfg.sdpa_backend, _probe_tensor(precision, device), training, mask=None)


@dataclass(frozen=True)
class MaskedCalls:
    """Calls that reach SDPA with a mask: which mask, why a run makes them, and what avoids them."""

    mask: str
    why: str
    instead: str


# Unpadded batches reach SDPA with no mask (transformers drops an all-ones mask), so e.g. CUDA's
# flash kernel serves them; a padded batch would fail at its first step instead.
PADDED_BATCHES = MaskedCalls("a padding mask", "this run's batches are padded", "inputs of one length")
# A static cache is preallocated to its full length: each decode step masks the positions not yet written.
STATIC_CACHE_DECODE = MaskedCalls(
    "the mask of a static KV cache",
    "benchmark.kv_cache=static decodes through one",
    "benchmark.kv_cache=dynamic",
)


def masked_decode(timing: TimingConfig) -> MaskedCalls | None:
    """The masked calls a generation timing makes: those of a static cache's decode steps, if any."""
    return STATIC_CACHE_DECODE if timing.new_tokens > 0 and timing.kv_cache == "static" else None


def check_mask_support(
    cfg: AttentionConfig,
    precision: str,
    device: torch.device,
    masked: MaskedCalls | None,
    training: TrainingCall | None = None,
) -> None:
    """Refuse a forced kernel that cannot take the mask of the `masked` calls this run will make."""
    if cfg.sdpa_backend is None or masked is None:
        return
    q = _probe_tensor(precision, device)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=device).tril()
    if not _kernel_runs(SDPA_KERNELS[cfg.sdpa_backend], q, mask):
        raise ConfigError(
            f"attention.sdpa_backend={cfg.sdpa_backend} cannot take {masked.mask} on {device.type}, and "
            f"{masked.why}; use attention.sdpa_backend=null (PyTorch picks per call) or {masked.instead}"
        )
    _check_forced_kernel(cfg.sdpa_backend, q, training, mask)


def _probe_tensor(precision: str, device: torch.device) -> torch.Tensor:
    return torch.randn(1, 2, 8, 64, device=device, dtype=getattr(torch, PRECISIONS[precision]))


def _check_forced_kernel(
    backend: str, q: torch.Tensor, training: TrainingCall | None, mask: torch.Tensor | None
) -> None:
    """Run a tiny attention under the forced kernel as evaluation and training will call it (the
    only reliable test that the kernel exists for that call here): without grad or dropout, then
    with grad, backward and the model's attention dropout."""
    kernel, device = SDPA_KERNELS[backend], q.device.type
    if not _kernel_runs(kernel, q, mask):
        available = [name for name, other in SDPA_KERNELS.items() if _kernel_runs(other, q, mask)]
        raise ConfigError(
            f"attention.sdpa_backend={backend} has no kernel on {device} for {q.dtype}; "
            f"available here: {available}"
        )
    if training is None or _kernel_runs(kernel, q, mask, training.dropout, grad=True):
        return
    if _kernel_runs(kernel, q, mask, 0.0, grad=True):
        raise ConfigError(
            f"attention.sdpa_backend={backend} takes no attention dropout on {device}, and training would "
            f"pass this model's {training.dropout_key}={training.dropout}; set it to 0 (model.arch."
            f"{training.dropout_key}=0 for a model built from model.arch) or use attention.sdpa_backend=null"
        )
    trainable = [name for name, other in SDPA_KERNELS.items() if _kernel_runs(other, q, mask, 0.0, grad=True)]
    raise ConfigError(
        f"attention.sdpa_backend={backend} has no training (backward) kernel on {device} for {q.dtype}; "
        f"kernels that train here: {trainable}"
    )


def _kernel_runs(
    kernel: SDPBackend,
    q: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    grad: bool = False,
) -> bool:
    q = q.detach().requires_grad_(grad)
    try:  # torch warns why a kernel refuses a call: here a refusal is the answer, not news
        with sdpa_kernel(kernel), torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=dropout)
            if grad:
                out.sum().backward()
    except RuntimeError:
        return False
    return True


def check_model_supports(cfg: AttentionConfig, model_class: type) -> None:
    """Refuse an implementation the model class does not declare support for (before loading weights)."""
    flag = _SUPPORT_FLAGS.get(cfg.implementation)
    if flag is not None and not getattr(model_class, flag, False):
        supported = ["eager"] + [impl for impl, f in _SUPPORT_FLAGS.items() if getattr(model_class, f, False)]
        raise ConfigError(
            f"attention={cfg.implementation} is not supported by {model_class.__name__}; "
            f"it supports {supported}"
        )


@contextlib.contextmanager
def forced_kernel(backend: str | None) -> Iterator[None]:
    """Force one SDPA kernel for the enclosed forwards; a no-op when none is configured."""
    if backend is None:
        yield
        return
    with sdpa_kernel(SDPA_KERNELS[backend]):
        yield
