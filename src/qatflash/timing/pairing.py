"""Which float row each timed model's latency ratio is paired with: only one timed under the same
conditions (device, backend, thread count, compute dtype; the backend says eager, compiled or
ONNX Runtime).

A ratio across conditions answers another question than "what does quantizing buy": pt2e's
compiled INT8 over eager float mixes in what compiling buys, a CPU INT8 over float on CUDA what the
device buys, a bfloat16 MXFP8 over float32 what bfloat16 buys. So a row's `ratio_to_float` pairs it with its like, named in `ratio_reference`, or
carries no ratio and says why. Rows of another backend than eager torch are also paired with eager
torch's float on the same device and threads (`ratio_to_torch_float`): the deployment question
"ONNX Runtime INT8 or torch float?", named as such.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from qatflash.results import FLOAT
from qatflash.timing.latency import SideBySide

Key = tuple[str, str]  # (variant, backend)


class Conditions(NamedTuple):
    device: str
    backend: str
    threads: int
    dtype: str

    def __str__(self) -> str:
        return f"{self.device} {self.dtype} with {self.backend} at {self.threads} threads"


def is_reference(key: Key) -> bool:
    """Float rows (`float`, and `float_at_target`, float timed where the quantized model runs
    when that is not where it trained) are references."""
    return key[0].startswith(FLOAT)


def paired_ratios(
    timed: dict[Key, SideBySide], conditions: dict[Key, Conditions]
) -> dict[Key, dict[str, Any]]:
    """For each row: its ratio to its like-for-like float row (not for the float rows themselves)
    and, off eager torch, to eager torch's float row; each with its spread and its reference named."""
    references = [key for key in timed if is_reference(key)]

    def like(wanted: Conditions) -> Key | None:
        return next((key for key in references if conditions[key] == wanted), None)

    out: dict[Key, dict[str, Any]] = {key: {} for key in timed}
    for key in timed:
        own = conditions[key]
        if not is_reference(key):
            out[key].update(_ratio(timed, key, like(own), FLOAT, own))
        if own.backend != "torch":
            eager = own._replace(backend="torch")
            out[key].update(_ratio(timed, key, like(eager), f"torch_{FLOAT}", eager))
    return out


def _ratio(
    timed: dict[Key, SideBySide], key: Key, reference: Key | None, name: str, wanted: Conditions
) -> dict[str, Any]:
    named = "ratio_reference" if name == FLOAT else f"{name}_reference"
    if reference is None:
        return {named: None, f"ratio_to_{name}_missing": f"no float row timed on {wanted}"}
    paired = timed[key].ratio_to(timed[reference])
    return {**{f"{k}_to_{name}": v for k, v in paired.items()}, named: "/".join(reference)}
