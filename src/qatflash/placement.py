"""Where a model runs: the one authority that puts a timed or generating model on its device
(testing is Lightning's: its trainer places the module it tests).

Two facts make a plain `model.to(device)` wrong, both seen on an H200:
- Lightning moves a model to its accelerator for a fit or a test and back to the CPU at teardown,
  so no stage may assume a model is where an earlier one left it: whatever runs a model places it
  first, on the device its contender names (generation after a GPU fit once ran a CPU model on
  CUDA inputs).
- `nn.Module.to` moves parameters and buffers, and only those. Quantization libraries hang more
  tensors on the objects it moves: bitsandbytes keeps LLM.int8's int8 matrix (`CB`, the weight's
  own data) and row scales (`SCB`) as attributes of the weight and, after a first forward, on the
  module's matmul state; NF4 keeps its block scales in the weight's `quant_state`. `.to` moves a
  weight's data in
  place and leaves such attributes where they were, and the first CUDA matmul then fails
  ("Expected a cuda device, but got: cpu" from bitsandbytes' int8 matmul).

`place` moves those too (an attribute that was a view of a parameter's or buffer's data follows
that data; any other is moved), then checks that every tensor the model holds is on the device:
a library state it does not know fails there, naming the tensor, not inside a kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import FunctionType, MethodType, ModuleType

import torch
from torch import nn

# How deep the search for tensors goes below a module or parameter: bitsandbytes' NF4 statistics
# sit at weight.quant_state.state2.absmax.
_MAX_DEPTH = 3


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every tensor it holds (parameters, buffers, and tensors attached to them or to
    its modules) on `device`; raises naming any that could not be moved."""
    if device.type == "cuda" and device.index is None:
        raise ValueError(f"place() needs an indexed CUDA device (cuda:0), got {device}")
    followers = _views_of_owned_data(model)
    model.to(device)
    for owner, attribute, _, tensor in list(attached_tensors(model)):
        follows = followers.get((id(owner), attribute))
        if follows is not None:
            module, key = follows
            setattr(owner, attribute, getattr(module, key).data)
        elif tensor.device != device:
            setattr(owner, attribute, tensor.to(device))
    stray = misplaced(model, device)
    if stray:
        raise RuntimeError(
            f"placing the model on {device} left {len(stray)} tensor(s) elsewhere: {', '.join(stray[:5])}"
        )
    return model


def misplaced(model: nn.Module, device: torch.device) -> list[str]:
    """The names of the tensors `model` holds that are not on `device` (parameters, buffers and
    attached tensors alike), each with the device it is on."""
    owned = [
        *model.named_parameters(),
        *model.named_buffers(),
        *((name, t) for _, _, name, t in attached_tensors(model)),
    ]
    return [f"{name} ({t.device})" for name, t in owned if t.device != device]


def attached_tensors(model: nn.Module) -> Iterator[tuple[object, str, str, torch.Tensor]]:
    """Tensors held as plain attributes of `model`'s modules and parameters, or of state objects
    they hold (bitsandbytes' MatmulLtState and QuantState): (owner, attribute, qualified name,
    tensor). Names starting with `_` are PyTorch's and Lightning's own bookkeeping, never walked."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        yield from _walk(module, prefix, 0, seen)
        for name, param in module.named_parameters(prefix=prefix, recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield from _walk(param, name, 1, seen)


def _walk(
    owner: object, prefix: str, depth: int, seen: set[int]
) -> Iterator[tuple[object, str, str, torch.Tensor]]:
    for attribute, value in list(vars(owner).items()):
        if attribute.startswith("_") or id(value) in seen:
            continue
        name = f"{prefix}.{attribute}" if prefix else attribute
        if isinstance(value, torch.Tensor):
            if not isinstance(value, nn.Parameter):  # parameters are registered somewhere: moved by .to
                yield owner, attribute, name, value
        elif depth < _MAX_DEPTH and _holds_state(value):
            seen.add(id(value))
            yield from _walk(value, name, depth + 1, seen)


def _holds_state(value: object) -> bool:
    """A plain object whose attributes may hold tensors (not a module: those are walked as modules)."""
    skipped = (nn.Module, type, FunctionType, MethodType, ModuleType, str, bytes, int, float, bool)
    return hasattr(value, "__dict__") and not isinstance(value, skipped)


def _views_of_owned_data(model: nn.Module) -> dict[tuple[int, str], tuple[nn.Module, str]]:
    """Attached tensors that are the data of one of the model's parameters or buffers (bitsandbytes'
    `CB` is its weight's int8 data): (id(owner), attribute) -> (module, parameter or buffer name)."""
    owners = {}
    for module in model.modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for key, tensor in own:
            if (pointer := _data_pointer(tensor)) is not None:
                owners.setdefault((pointer, tuple(tensor.shape)), (module, key))
    views = {}
    for owner, attribute, _, tensor in attached_tensors(model):
        pointer = _data_pointer(tensor)
        if pointer is not None and (pointer, tuple(tensor.shape)) in owners:
            views[id(owner), attribute] = owners[pointer, tuple(tensor.shape)]
    return views


def _data_pointer(tensor: torch.Tensor) -> int | None:
    """Where a plain tensor's data starts; None for empty tensors and tensor subclasses without storage."""
    if tensor.numel() == 0:
        return None
    try:
        return tensor.data_ptr()
    except RuntimeError:
        return None
