"""Which FP32 row each timed model's latency ratio is paired with: only one timed under the same
conditions (device, backend, thread count; the backend says eager, compiled or ONNX Runtime).

A ratio across conditions answers another question than "what does quantizing buy": pt2e's
compiled INT8 over eager FP32 mixes in what compiling buys, a CPU INT8 over FP32 on CUDA what the
device buys. So a row's `ratio_to_fp32` pairs it with its like, named in `ratio_reference`, or
carries no ratio and says why. Rows of another backend than eager torch are also paired with eager
torch's FP32 on the same device and threads (`ratio_to_torch_fp32`): the deployment question
"ONNX Runtime INT8 or torch FP32?", named as such.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from qatflash.timing.latency import SideBySide

Key = tuple[str, str]  # (variant, backend)


class Conditions(NamedTuple):
    device: str
    backend: str
    threads: int

    def __str__(self) -> str:
        return f"{self.device} with {self.backend} at {self.threads} threads"


def is_reference(key: Key) -> bool:
    """FP32 rows (`fp32`, and `fp32_cpu`, FP32 timed on the CPU beside a CPU INT8) are references."""
    return key[0].startswith("fp32")


def paired_ratios(
    timed: dict[Key, SideBySide], conditions: dict[Key, Conditions]
) -> dict[Key, dict[str, Any]]:
    """For each row: its ratio to its like-for-like FP32 (not for the FP32 rows themselves) and, off
    eager torch, to eager torch's FP32; each with its spread and its reference named."""
    references = [key for key in timed if is_reference(key)]

    def like(wanted: Conditions) -> Key | None:
        return next((key for key in references if conditions[key] == wanted), None)

    out: dict[Key, dict[str, Any]] = {key: {} for key in timed}
    for key in timed:
        own = conditions[key]
        if not is_reference(key):
            out[key].update(_ratio(timed, key, like(own), "fp32", own))
        if own.backend != "torch":
            eager = own._replace(backend="torch")
            out[key].update(_ratio(timed, key, like(eager), "torch_fp32", eager))
    return out


def _ratio(
    timed: dict[Key, SideBySide], key: Key, reference: Key | None, name: str, wanted: Conditions
) -> dict[str, Any]:
    named = "ratio_reference" if name == "fp32" else f"{name}_reference"
    if reference is None:
        return {named: None, f"ratio_to_{name}_missing": f"no FP32 row timed on {wanted}"}
    paired = timed[key].ratio_to(timed[reference])
    return {**{f"{k}_to_{name}": v for k, v in paired.items()}, named: "/".join(reference)}
