"""The verbs every quantization recipe offers, whichever API (torch.ao eager, torchao, pt2e) does the work.

The pipeline and the QAT callback speak only these verbs, so a sweep compares APIs by changing
`quant.api` in YAML: select targets (refused early if none match), prepare (fake quantization or
observers; may return a new module, as torch.export does), switch fake quantization and observers
per step, convert, and save/load the quantized artifact so that it reproduces its logits.
A recipe also declares what it makes (`target`: format, device, dtype, decided by its config) and
where its kernels run, says what it accepts (methods, engines) and checks its own config, before
any data is loaded, so that adding an API changes neither the schema nor the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from qatflash.config import QUANT_ENGINES, QuantConfig
from qatflash.errors import require
from qatflash.placement import place
from qatflash.quant.artifact import load_state, save_state
from qatflash.quant.target import Target
from qatflash.quant.targeting import embedding_targets, linear_targets

# QuantConfig's fields that decide how a model's scales are found (by calibration or by training,
# when, from whom), not what numbers it ships: left out of `Recipe.scheme`. `targets` is there as
# the modules it selected.
HOW_SCALES_ARE_FOUND = (
    "method",
    "calibration_batches",
    "fake_quant_start_step",
    "freeze_observers_step",
    "distill",
    "range_lr",
    "lora",
    "targets",
)


class Recipe(ABC):
    """One `quant/*.yaml`: how its targeted Linear layers become quantized, and into what."""

    # The quantized artifact's file name in the run folder.
    artifact_name = "quantized_model.pt"
    # Whether the converted model runs its quantized kernels only through torch.compile (pt2e: in eager mode
    # its graph merely simulates quantization), so it is timed compiled whatever the backend.
    compiled_only = False
    # The quant.method values and quant.engine values this API implements.
    methods: ClassVar[tuple[str, ...]]
    engines: ClassVar[tuple[str, ...]] = QUANT_ENGINES
    # Why its prepared models cannot be pickled to spawned workers (trainer=ddp), or "" if they can.
    unpicklable: ClassVar[str] = ""
    # Whether two of its recipes can share a model, each preparing and converting only its own
    # targets (quant.api=mixed composes them).
    composable: ClassVar[bool] = False

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        """Refuse a config this API cannot run, in one line, before any data is loaded."""
        require(
            cfg.method in cls.methods,
            f"quant.method={cfg.method} is not available with quant.api={cfg.api}; it offers {list(cls.methods)}",
        )
        require(
            cfg.engine in cls.engines,
            f"quant.engine={cfg.engine}: quant.api={cfg.api} targets {', '.join(cls.engines)}",
        )
        if cfg.range_lr is not None:
            reason = cls.ranges_unlearnable(cfg)
            require(reason is None, f"quant.range_lr={cfg.range_lr}: {reason}")

    @classmethod
    def ranges_unlearnable(cls, cfg: QuantConfig) -> str | None:
        """Why this API cannot learn the ranges of `cfg`'s quantization (None: it can)."""
        return (
            f"quant.api={cfg.api} has no learnable quantization ranges; eager learns weights' and "
            "activations', torchao weights'"
        )

    @abstractmethod
    def target(self) -> Target:
        """What `convert` makes and where: the format, the device its kernels run on, and the dtype
        around them; a job ships, tests and times its quantized model there."""

    def scheme(self) -> dict[str, Any]:
        """What decides the shipped model's numbers, whichever way its scales were found: the target,
        the modules quantized, and the recipe's config less `HOW_SCALES_ARE_FOUND` (and observer
        kinds). A PTQ and a QAT of one scheme give the same; a QAT's recovery over PTQ is read
        between those two only (`qatflash.report.recovery`)."""
        numbers = {k: v for k, v in asdict(self.cfg).items() if k not in HOW_SCALES_ARE_FOUND}
        numbers.pop("parts")  # a mixed recipe's own scheme is its parts'
        for tensor in ("activation", "weight"):
            if numbers[tensor] is not None:
                numbers[tensor].pop("observer")
        if numbers["torchao"] is not None:  # QAT's fake-quantize configs; `convert` is what ships
            numbers["torchao"] = {
                k: v for k, v in numbers["torchao"].items() if k not in ("activation", "weight")
            }
        return {"target": str(self.target()), "modules": sorted(self.selected), **numbers}

    def product_record(self) -> dict[str, str]:
        """What results.json's model section says of the product: target, format and scheme key."""
        encoded = json.dumps(self.scheme(), sort_keys=True, default=str).encode()
        return {**self.target().record(), "scheme": hashlib.sha256(encoded).hexdigest()[:16]}

    def devices(self) -> tuple[str, ...]:
        """The devices its quantized kernels run on (a benchmark may time it on any of them)."""
        return (self.target().device,)

    def check_device(self, device: str) -> None:
        """Refuse a benchmark's `bench.device` (cpu, cuda) where this recipe's kernels do not run, or
        a machine that lacks the compute capability they need."""
        target = self.target()
        require(
            device in self.devices(),
            f"quant.api={self.cfg.api} makes {target.format}, whose kernels run on {list(self.devices())}; "
            f"bench.device={device} has none of them",
        )
        if device == "cuda":
            reason = Target(target.format, "cuda", target.dtype, target.capability).unreachable()
            require(reason is None, f"bench.device=cuda: {reason}")

    def unshippable(self) -> str | None:
        """Why this machine cannot make or run the quantized model (None: it can)."""
        return self.target().unreachable()

    def delays_fake_quant(self) -> bool:
        """Whether its fake quantization can be switched off until a later step (the QAT schedule's
        start); a recipe whose prepared modules have no switch fake-quantizes from step 0."""
        return True

    def fake_quant_unreachable(self) -> str | None:
        """Why this machine cannot run even the fake quantization (None: it can, as it can for
        every format whose fake quantization is float arithmetic)."""
        return None

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.targets: list[str] = []
        self.tables: list[str] = []

    def select_targets(self, model: nn.Module) -> list[str]:
        """The Linear layers this recipe quantizes in `model`, GPT-2-style Conv1D projections among
        them turned into nn.Linear in place (ConfigError when the patterns match none, or match a
        module type no recipe quantizes); and the embedding tables it quantizes (`tables`)."""
        self.targets = linear_targets(model, self.cfg.targets)
        self.tables = embedding_targets(model) if self.cfg.embeddings == "int8" else []
        return self.targets

    @property
    def selected(self) -> list[str]:
        """Every module this recipe quantizes: its Linear targets and embedding tables."""
        return [*self.targets, *self.tables]

    def check_converted(self, model: nn.Module) -> int:
        """The number of modules that run quantized in a converted model, refused unless it is the
        number selected: a recipe that silently leaves a target float must not be recorded as
        quantizing it."""
        found = self.count_quantized(model)
        if found != len(self.selected):
            raise RuntimeError(
                f"quant.api={self.cfg.api} converted {found} modules to quantized ones, but selected "
                f"{len(self.selected)} ({len(self.targets)} Linear targets, {len(self.tables)} embedding tables)"
            )
        return found

    @abstractmethod
    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train (QAT) or calibrate (static PTQ): fake quantization or observers in place."""

    @abstractmethod
    def is_prepared(self, model: nn.Module) -> bool: ...

    @abstractmethod
    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        """Switch fake quantization and observer updates; recipes without observers ignore `observe`."""

    def range_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The prepared model's learnable ranges (scales, zero points), trained at `quant.range_lr`."""
        return []

    def prepared_linear(self, target: str) -> str:
        """Where a target's fake-quantized Linear sits in the prepared model (LoRA wraps it there)."""
        return target

    def reobserve_weights(self, model: nn.Module) -> None:
        """Set the weights' ranges again from the weights as they are (LoRA's merge moved them); a
        recipe whose fake quantization computes them on every call has nothing to do."""
        return None

    def initialize_ranges(self, model: nn.Module) -> None:
        """Set learnable ranges from the model as it is where fake quantization starts; a recipe
        whose observers set them first (or that learns none) has nothing to do."""
        return None

    @abstractmethod
    def convert(self, model: nn.Module) -> nn.Module:
        """The quantized model (eval mode), converted where `model` is."""

    def converted(self, model: nn.Module) -> nn.Module:
        """`model` (prepared) converted where its target says: moved to the target's device and
        dtype first. The one way a job's quantized model is made, so it is made, tested, saved and
        timed where it will run."""
        target = self.target()
        return self.convert(place(model, target.torch_device).to(target.torch_dtype))

    @abstractmethod
    def count_quantized(self, model: nn.Module) -> int:
        """Modules (Linear layers, embedding tables) that run with quantized weights in a converted model."""

    def qdq_unavailable(self) -> str | None:
        """Why ONNX Runtime cannot run this recipe's own quantization (`qdq_model`), or None when it can."""
        return f"quant.api={self.cfg.api} has no QDQ form: its quantized model cannot be exported to ONNX"

    def qdq_model(self, prepared: nn.Module) -> nn.Module:
        """The prepared model's quantization as quantize/dequantize pairs and int8 weights, for ONNX export."""
        raise NotImplementedError(self.qdq_unavailable())

    def save(self, model: nn.Module, path: Path) -> int:
        """Write the quantized artifact; returns its size in bytes."""
        return save_state(model, path)

    def load(self, path: Path, skeleton: Callable[[], nn.Module]) -> nn.Module:
        """Read an artifact written by `save`; `skeleton` builds the float model it was converted from."""
        target = self.target()
        return place(
            load_state(lambda: self.converted(self.prepare(skeleton().train())), path), target.torch_device
        )
