"""What runs a timed forward: eager torch, `torch.compile`, or ONNX Runtime (TIMING_BACKENDS names them).

A backend does two jobs. In a `qatflash-bench` point it turns the built model into what it runs
(`wrap`). In a training job it says which of the job's models it times, where and in which
precision (`job_models`); ONNX Runtime also makes its own models there (the float export, its
dynamic INT8 of it, the recipe's QDQ graph), which the job tests for accuracy as well.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from qatflash.config import DTYPE_PRECISIONS, PRECISIONS
from qatflash.errors import ConfigError
from qatflash.placement import place
from qatflash.quant.ship import Shipped
from qatflash.results import FLOAT, FLOAT_AT_TARGET, QUANTIZED
from qatflash.timing.latency import Contender

_CPU = torch.device("cpu")


def _float_cpu_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of `model` on the CPU, leaving the job's own (perhaps CUDA, bf16) untouched."""
    return place(copy.deepcopy(model).float(), _CPU)


@dataclass(frozen=True)
class JobTiming:
    """What a training job hands each backend: its models and where its float model runs."""

    shipped: Shipped
    device: torch.device
    precision: str  # the training precision: the float model runs under its autocast
    autocast: torch.dtype | None
    folder: Path
    example: dict[str, torch.Tensor]  # real inputs, for exports
    max_len: int | None
    threads: int


@dataclass(frozen=True)
class BackendModels:
    """A backend's share of a training job: models to time by (variant, backend), the variants it
    also tests (with the suffix of their metrics), and what results.json's model section records."""

    timed: dict[tuple[str, str], Contender]
    tested: dict[tuple[str, str], str] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class TimingBackend:
    """The interface, and eager torch (the model as it is): other backends override what differs."""

    name: ClassVar[str] = "torch"
    # Whether its first call at the timed shape does work a warm-up on a small input would not
    # (compilation), so a benchmark warms up at full size.
    warm_at_full_size: ClassVar[bool] = False
    # Whether what it runs is torch's, so the profiler can name the attention kernel inside it.
    runs_torch: ClassVar[bool] = True

    def check(self, device: str | None = None, dtype: str | None = None) -> None:
        """Refuse, before any work, what this backend cannot run (None: whatever the job trains on)."""

    def wrap(self, model: nn.Module, example: dict[str, torch.Tensor], max_len: int | None) -> nn.Module:
        """The model as this backend runs it (same forward signature)."""
        return model

    def job_models(self, job: JobTiming) -> BackendModels:
        """The float model where the job trained it, and the quantized model where its recipe's
        target says (its device and dtype; one that runs only compiled, pt2e's, under torch_compile
        whichever torch backend was asked for). Where the quantized model runs under other
        conditions than the float one (on the CPU after a CUDA fit, in bfloat16 after a float32 fit,
        compiled), the float model is timed there too, so that its ratio pairs like with like."""
        shipped = job.shipped
        # Under autocast the float model keeps float32 weights and casts them at every call: not
        # the bfloat16 model a bfloat16 target is compared with, so it is not its like.
        float_dtype = PRECISIONS[job.precision] + (" autocast" if job.autocast is not None else "")
        timed = {
            (FLOAT, self.name): Contender(
                self.wrap(shipped.float_model, job.example, job.max_len),
                job.device,
                job.autocast,
                job.precision,
                float_dtype,
            )
        }
        if shipped.quantized is not None and shipped.recipe is not None:
            target = shipped.recipe.target()
            backend = CompiledBackend() if shipped.recipe.compiled_only else self
            timed[QUANTIZED, backend.name] = Contender(
                backend.wrap(shipped.quantized, job.example, job.max_len),
                target.torch_device,
                None,
                target.format,
                target.dtype,
            )
            alike = job.device.type == target.device and float_dtype == target.dtype
            if backend is not self or not alike:
                twin = place(copy.deepcopy(shipped.float_model).to(target.torch_dtype), target.torch_device)
                timed[FLOAT if alike else FLOAT_AT_TARGET, backend.name] = Contender(
                    backend.wrap(twin, job.example, job.max_len),
                    target.torch_device,
                    None,
                    DTYPE_PRECISIONS[target.dtype],
                    target.dtype,
                )
        return BackendModels(timed)


class CompiledBackend(TimingBackend):
    """`torch.compile` (Inductor) of the model."""

    name = "torch_compile"
    warm_at_full_size = True

    def wrap(self, model: nn.Module, example: dict[str, torch.Tensor], max_len: int | None) -> nn.Module:
        return torch.compile(model)


class OnnxRuntimeBackend(TimingBackend):
    """ONNX Runtime on the CPU in float32: the float model exported (`qatflash.ort`), ONNX Runtime's
    dynamic INT8 of that export (the deployment baseline a recipe must beat), and the recipe's own
    quantization as a QDQ graph where it has one."""

    name = "onnxruntime"
    runs_torch = False

    def check(self, device: str | None = None, dtype: str | None = None) -> None:
        from qatflash.ort import check_onnxruntime

        check_onnxruntime()
        if (device or "cpu") != "cpu" or (dtype or "float32") != "float32":
            raise ConfigError(
                f"benchmark.backends includes onnxruntime, which runs float32 on the CPU here; "
                f"got bench.device={device} bench.dtype={dtype}"
            )

    def wrap(self, model: nn.Module, example: dict[str, torch.Tensor], max_len: int | None) -> nn.Module:
        from qatflash.ort import OrtModel, export_onnx

        with tempfile.TemporaryDirectory() as folder:  # the session holds the model once loaded
            path = Path(folder) / "model.onnx"
            export_onnx(model, path, example, max_len)
            return OrtModel(path, torch.get_num_threads())

    def job_models(self, job: JobTiming) -> BackendModels:
        from qatflash.ort import (
            ORT_INT8_METHOD,
            ORT_INT8_SETTINGS,
            OrtModel,
            export_onnx,
            quantize_onnx,
            weight_matmul_coverage,
        )

        paths = {FLOAT: job.folder / "model_float.onnx", "int8": job.folder / "model_int8_ort.onnx"}
        exported = _float_cpu_copy(job.shipped.float_model)
        record: dict[str, Any] = {
            "onnx_float_bytes": export_onnx(exported, paths[FLOAT], job.example, job.max_len)
        }
        record["onnx_int8_bytes"] = quantize_onnx(paths[FLOAT], paths["int8"])
        coverage = weight_matmul_coverage(paths[FLOAT], paths["int8"])
        record.update(
            onnx_int8_method=ORT_INT8_METHOD,
            onnx_int8_settings=ORT_INT8_SETTINGS,
            onnx_int8_weight_matmuls=coverage,
        )
        recipe, prepared = job.shipped.recipe, job.shipped.prepared
        if recipe is not None and prepared is not None:
            if (reason := recipe.qdq_unavailable()) is None:
                paths["qdq"] = job.folder / "model_qdq.onnx"
                record["onnx_qdq_bytes"] = export_onnx(
                    recipe.qdq_model(prepared), paths["qdq"], job.example, job.max_len
                )
            else:
                record["onnx_qdq_skipped"] = reason
        precisions = {FLOAT: "32-true", "int8": "int8", "qdq": "int8"}
        timed = {
            (variant, self.name): Contender(OrtModel(path, job.threads), _CPU, None, precisions[variant])
            for variant, path in paths.items()
        }
        # QAT's float reference is the model before fine-tuning, and ORT's INT8 is made from it: never scored.
        tested = [v for v in paths if job.shipped.float_trained or v == "qdq"]
        warnings = []
        if coverage["float"]:
            warnings.append(
                f"ONNX Runtime's dynamic INT8 left {coverage['float']} of {coverage['weight_matmuls']} weight "
                "matmuls in float: its onnxruntime int8 rows are partly float"
            )
        return BackendModels(timed, {(v, self.name): f"ort_{v}" for v in tested}, record, warnings)
