"""PT2E recipes: `torch.export` the model, quantize the graph with X86InductorQuantizer, run INT8 via Inductor.

The exported graph is traced once with dynamic batch and sequence dimensions, so padded batches
of any length (up to the model's positions) run through the same prepared graph. Targeting is by
module name (`set_module_name_qconfig`), which export keeps in each node's module stack, so the
same `quant.targets` presets select the same Linears as in eager mode. Embedding tables stay
float: the x86 Inductor quantizer has no embedding pattern.
"""

from __future__ import annotations

import copy
import shutil
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchao.quantization import pt2e
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

from qatflash.config import QuantConfig
from qatflash.errors import ConfigError, require
from qatflash.models import max_positions
from qatflash.quant.recipe import Recipe
from qatflash.quant.target import Target

# Shapes traced for export: dynamic dimensions must not start at a size export specializes (0, 1).
_EXAMPLE_SHAPE = (2, 16)
_QUANTIZED_WEIGHT = "dequantize_per_channel"


def check_compiler() -> None:
    """Inductor compiles CPU kernels from C++: refuse up front rather than after training."""
    if not (shutil.which("g++") or shutil.which("clang++")):
        raise ConfigError(
            "quant.api=pt2e runs INT8 through torch.compile (Inductor), which needs a C++ compiler "
            "(g++ or clang++) on PATH; none found. Use quant.api=eager or torchao"
        )


class Pt2eRecipe(Recipe):
    """QAT (`qat`) or static PTQ (`ptq_static`) of an exported graph for the x86 Inductor backend."""

    artifact_name = "quantized_model.pt2"
    compiled_only = True
    methods = ("ptq_static", "qat")
    engines = ("x86",)  # (Inductor)
    unpicklable = "exported graphs do not support"

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        super().check_config(cfg)
        require(
            cfg.embeddings == "float",
            "quant.embeddings=int8: the x86 Inductor quantizer (quant.api=pt2e) keeps embeddings float",
        )
        require(
            cfg.lora is None,
            "quant.lora: quant.api=pt2e trains an exported graph, which has no module tree to wrap adapters in",
        )

    def __init__(self, cfg: QuantConfig) -> None:
        check_compiler()
        super().__init__(cfg)
        # Filled from the float model's config by `prepare`; exported graphs carry no HF config.
        self.vocab_size = 0
        self.max_length: int | None = None
        self.decoder = False

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """What the graph is traced on: token ids, and for encoders their attention mask (a decoder,
        one that can generate, is called on token ids alone and builds its causal mask itself)."""
        ids = torch.randint(0, self.vocab_size, _EXAMPLE_SHAPE)
        return (
            {"input_ids": ids} if self.decoder else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        )

    def _export(self, model: nn.Module, example: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
        dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("seq", min=2, max=self.max_length)}
        device = next(model.parameters()).device
        example = {k: v.to(device) for k, v in example.items()}
        return torch.export.export(model, (), example, dynamic_shapes={k: dims for k in example})

    def prepare(self, model: nn.Module) -> nn.Module:
        self.select_targets(model)
        self.vocab_size = model.config.vocab_size
        self.max_length = max_positions(model.config)
        self.decoder = model.can_generate()
        qat = self.cfg.method == "qat"
        quantizer = x86.X86InductorQuantizer()
        qconfig = x86.get_default_x86_inductor_quantization_config(is_qat=qat)
        for name in self.targets:
            quantizer.set_module_name_qconfig(name, qconfig)
        # Traced in eval mode, so the graph holds no dropout: a train-mode trace bakes attention
        # dropout into the SDPA call as a constant that no train/eval switch removes afterwards.
        # QAT through pt2e therefore fine-tunes without dropout.
        graph = self._export(model.eval(), self.example_inputs()).module()
        prepare = prepare_qat_pt2e if qat else prepare_pt2e
        return _fixed_mode(prepare(graph, quantizer))

    def is_prepared(self, model: nn.Module) -> bool:
        return any(isinstance(m, pt2e.FakeQuantizeBase | pt2e.ObserverBase) for m in model.modules())

    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        model.apply(pt2e.enable_fake_quant if fake_quant else pt2e.disable_fake_quant)
        model.apply(pt2e.enable_observer if observe else pt2e.disable_observer)

    def target(self) -> Target:
        return Target("int8", "cpu", "float32")  # x86 Inductor's INT8 kernels

    def convert(self, model: nn.Module) -> nn.Module:
        return _fixed_mode(_without_unused_tensors(convert_pt2e(model)))

    def qdq_unavailable(self) -> str | None:
        return None

    def qdq_model(self, prepared: nn.Module) -> nn.Module:
        """The converted graph is already QDQ (`quantized_decomposed` ops), which ONNX export keeps."""
        return self.convert(copy.deepcopy(prepared))

    def count_quantized(self, model: nn.Module) -> int:
        graph = model.graph if isinstance(model, torch.fx.GraphModule) else model.module().graph
        return sum(_QUANTIZED_WEIGHT in str(node.target) for node in graph.nodes)

    def save(self, model: nn.Module, path: Path) -> int:
        """The converted graph, exported again: weights and program in one file, loadable without Python code."""
        tmp = path.with_name(f".tmp.{path.name}")
        torch.export.save(self._export(model, self.example_inputs()), tmp)
        tmp.replace(path)
        return path.stat().st_size

    def load(self, path: Path, skeleton: Callable[[], nn.Module]) -> nn.Module:
        return _fixed_mode(torch.export.load(path).module())


def _without_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the float weights that convert_pt2e leaves on the module beside their int8 copies.

    The graph no longer reads them, but export would still save them: the artifact would be
    larger than the FP32 model (measured on MiniLM: 102.8 MB against 90.9 MB before this).
    """
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attribute)
    return graph


def _fixed_mode(graph: nn.Module) -> nn.Module:
    """Let Lightning and the benchmark call .train()/.eval() on an exported graph, changing nothing.

    The graph was traced in eval mode and stays that way (QAT through pt2e trains without dropout).
    torchao's own switch (`allow_exported_model_train_eval`) is not used: in torchao 0.18 it rewrites
    every dropout to p=0.5 whatever the model's rate, and cannot reach dropout baked into SDPA calls.
    """

    def keep(self: nn.Module, mode: bool = True) -> nn.Module:
        return self

    graph.train = types.MethodType(keep, graph)  # type: ignore[method-assign]
    graph.eval = types.MethodType(keep, graph)  # type: ignore[method-assign]
    return graph
