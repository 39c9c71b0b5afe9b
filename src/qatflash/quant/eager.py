"""torch.ao eager-mode INT8 recipes: dynamic PTQ, static PTQ and QAT, built from `quant/*.yaml`.

Each targeted Linear is wrapped in its own QuantWrapper (quantize -> Linear -> dequantize), so
quantization never depends on how the model's forward is called: Hugging Face models take keyword
arguments, which the Lightning 1.x callback's single-input wrapper around the whole model broke.
Embedding tables can be quantized weight-only (most of a BERT's bytes): fake-quantized per row
during QAT, so training sees the rounding that conversion applies, and quantized at conversion.

Learned ranges (`quant.range_lr`, LSQ) use torch.ao's `_LearnableFakeQuantize` for every Linear's
weights and activations: its observer sets the range until `quant.freeze_observers_step`, then the
scale (and an affine zero point) train by gradient, and conversion ships them as they are. The
embedding table keeps its per-row observer (torch.ao learns no float per-row zero points).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn import qat as nnqat
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

from qatflash.config import OBSERVERS, ObserverConfig, QuantConfig
from qatflash.errors import ConfigError, require
from qatflash.quant.attention_matmuls import add_attention_fake_quant, set_aside
from qatflash.quant.float_output import Int8LinearFloatOutput
from qatflash.quant.qdq import to_qdq
from qatflash.quant.recipe import Recipe
from qatflash.quant.target import Target
from qatflash.quant.targeting import replace_module

# The quantized engines whose packed Linear weights have fbgemm's float-output INT8 kernel.
FLOAT_OUTPUT_ENGINES = ("x86", "fbgemm")
# The token-embedding table under QAT: weight fake-quantized per row (uint8, float scale and
# offset), exactly as conversion stores it; its output stays float.
_EMBEDDING_QAT = tq.default_embedding_qat_qconfig
_QAT_MODULES = {**tq.get_default_qat_module_mappings(), nn.Embedding: nnqat.Embedding}
_INT8_MODULES = {**tq.get_default_static_quant_module_mappings(), nnqat.Embedding: nnq.Embedding}
_DYNAMIC_ACTIVATION = tq.PlaceholderObserver.with_args(
    dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True
)


def _observer(cfg: ObserverConfig, fake_quant: bool) -> Any:
    kwargs = {
        "dtype": getattr(torch, cfg.dtype),  # config names are torch's own (QUANT_DTYPES, QSCHEMES)
        "qscheme": getattr(torch, cfg.qscheme),
        "quant_min": cfg.quant_min,
        "quant_max": cfg.quant_max,
        "reduce_range": cfg.reduce_range,
    }
    observer = getattr(tq, OBSERVERS[cfg.observer])
    return (
        tq.FakeQuantize.with_args(observer=observer, **kwargs) if fake_quant else observer.with_args(**kwargs)
    )


def _learnable(cfg: ObserverConfig, channels: int = -1) -> Any:
    """An LSQ fake quantizer whose observer (`cfg`'s) sets its range until learning takes over, over
    the observer's own integer range (reduce_range halves it); `channels` scales for per-channel."""
    observer = _observer(cfg, fake_quant=False)()
    return _LearnableFakeQuantize.with_args(
        observer=type(observer),
        quant_min=observer.quant_min,
        quant_max=observer.quant_max,
        dtype=observer.dtype,
        qscheme=observer.qscheme,
        channel_len=channels,
        # No LSQ gradient scale (1/sqrt(elements x quant_max)): AdamW normalises each parameter's
        # step anyway, and the scale put some activation ranges' gradients (1e-11 on tiny_bert)
        # under AdamW's eps of 1e-8, which left them unlearned.
        use_grad_scaling=False,
    )


def check_engine(engine: str) -> None:
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ConfigError(
            f"quant.engine={engine} is not in this torch build; available: {[e for e in supported if e != 'none']}"
        )


class EagerRecipe(Recipe):
    """torch.ao eager mode: QuantWrapper per targeted Linear, observers or FakeQuantize, convert to fbgemm/x86/qnnpack kernels."""

    methods = ("ptq_dynamic", "ptq_static", "qat")

    @classmethod
    def check_config(cls, cfg: QuantConfig) -> None:
        super().check_config(cfg)
        needs = ("weight",) if cfg.method == "ptq_dynamic" else ("activation", "weight")
        missing = [f"quant.{name}" for name in needs if getattr(cfg, name) is None]
        require(not missing, f"quant.method={cfg.method} (api=eager) needs observers: {missing}")
        require(
            cfg.linear_output != "float" or cfg.engine in FLOAT_OUTPUT_ENGINES,
            f"quant.linear_output=float needs quant.engine in {list(FLOAT_OUTPUT_ENGINES)} (fbgemm's "
            f"float-output kernel), not {cfg.engine}",
        )

    @classmethod
    def ranges_unlearnable(cls, cfg: QuantConfig) -> str | None:
        if cfg.freeze_observers_step is None:
            return (
                "quant.api=eager learns the ranges its observers hand over at quant.freeze_observers_step, "
                "which is null; set it (a step, or a fraction of the fit's steps)"
            )
        return None

    def __init__(self, cfg: QuantConfig) -> None:
        check_engine(cfg.engine)
        super().__init__(cfg)
        qat = cfg.method == "qat"
        self.learns = cfg.range_lr is not None
        assert cfg.weight is not None, "QuantConfig checks that every method but none has weight observers"
        activation = _DYNAMIC_ACTIVATION
        if cfg.method != "ptq_dynamic":
            assert cfg.activation is not None, (
                "QuantConfig checks that static PTQ and QAT have activation observers"
            )
            activation = _learnable(cfg.activation) if self.learns else _observer(cfg.activation, qat)
        weight = _learnable(cfg.weight) if self.learns else _observer(cfg.weight, qat)
        self.qconfig = tq.QConfig(activation=activation, weight=weight)
        # The Linear inside each wrapper: its output is rounded like every activation, or stays float.
        self.linear_qconfig = self.qconfig
        if cfg.linear_output == "float":
            self.linear_qconfig = tq.QConfig(activation=nn.Identity, weight=self.qconfig.weight)

    def _qconfig_of(self, linear: nn.Linear) -> tq.QConfig:
        """A targeted Linear's qconfig: learned per-channel weight ranges need its output channels."""
        assert self.cfg.weight is not None, (
            "QuantConfig checks that every method but none has weight observers"
        )
        if not (self.learns and self.cfg.weight.qscheme.startswith("per_channel")):
            return self.linear_qconfig
        return self.linear_qconfig._replace(weight=_learnable(self.cfg.weight, linear.out_features))

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap the targeted Linears and insert observers (static PTQ) or fake quantization (QAT)."""
        self.select_targets(model)
        if self.cfg.method == "ptq_dynamic":
            return model  # dynamic quantization observes nothing ahead of conversion
        linear_qconfigs = {name: self._qconfig_of(model.get_submodule(name)) for name in self.targets}
        for name in self.targets:
            wrapper = tq.QuantWrapper(model.get_submodule(name))
            wrapper.qconfig = self.qconfig
            wrapper.module.qconfig = linear_qconfigs[name]
            replace_module(model, name, wrapper)
        if self.cfg.method == "qat":
            # Train against the per-row int8 table that conversion will ship: left to conversion
            # alone, the unseen rounding cost MiniLM 0.6 points of SST-2 between fake-quant and INT8.
            for name in self.tables:
                model.get_submodule(name).qconfig = _EMBEDDING_QAT
        with warnings.catch_warnings():
            # torch.ao warns about every untargeted submodule that has no qconfig: that is the point.
            warnings.simplefilter("ignore", UserWarning)
            if self.cfg.method == "qat":
                tq.prepare_qat(model, mapping=_QAT_MODULES, inplace=True)
            else:
                tq.prepare(model, inplace=True)
        # torch.ao leaves each module a qconfig whose observer constructors are local closures (they
        # build observers on the module's device), which cannot be pickled, and a spawned DDP worker
        # receives the model by pickle. Conversion runs on the CPU, where the plain qconfig does the same.
        for module in model.modules():
            if getattr(module, "qconfig", None) is not None:
                module.qconfig = _EMBEDDING_QAT if isinstance(module, nnqat.Embedding) else self.qconfig
        for name in self.targets:
            model.get_submodule(name).module.qconfig = linear_qconfigs[name]
        if self.cfg.attention_matmuls:
            add_attention_fake_quant(model, self.qconfig.activation)  # QAT's: fake quantization
        return model

    def is_prepared(self, model: nn.Module) -> bool:
        return any(isinstance(m, tq.FakeQuantizeBase | tq.ObserverBase) for m in model.modules())

    def set_phase(self, model: nn.Module, fake_quant: bool, observe: bool) -> None:
        """Learned ranges train whenever fake quantization runs without observers (after the freeze)."""
        model.apply(tq.enable_fake_quant if fake_quant else tq.disable_fake_quant)
        model.apply(tq.enable_observer if observe else tq.disable_observer)
        for module in model.modules():
            if isinstance(module, _LearnableFakeQuantize):
                module.toggle_qparam_learning(fake_quant and not observe)

    def prepared_linear(self, target: str) -> str:
        return f"{target}.module"  # inside its QuantWrapper

    def reobserve_weights(self, model: nn.Module) -> None:
        """Each QAT Linear's weight observer restarted on its weight as it is, once."""
        for module in model.modules():
            if isinstance(module, nnqat.Linear):
                quantizer = module.weight_fake_quant
                quantizer.activation_post_process.reset_min_max_vals()
                quantizer.enable_observer()
                with torch.no_grad():
                    quantizer(module.weight)
                quantizer.disable_observer()

    def range_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [
            parameter
            for module in model.modules()
            if isinstance(module, _LearnableFakeQuantize)
            for parameter in (module.scale, module.zero_point)
        ]

    def target(self) -> Target:
        return Target("int8", "cpu", "float32")  # torch.ao's quantized CPU kernels

    def convert(self, model: nn.Module) -> nn.Module:
        """The INT8 model for `cfg.engine` (eval mode), converted in place."""
        torch.backends.quantized.engine = self.cfg.engine
        model.eval()
        with warnings.catch_warnings(), set_aside(model):
            warnings.simplefilter("ignore")
            if self.cfg.method == "ptq_dynamic":
                tq.quantize_dynamic(model, {name: self.qconfig for name in self.targets}, inplace=True)
            else:
                if self.cfg.linear_output == "float":
                    for name in self.targets:
                        wrapper = model.get_submodule(name)
                        replace_module(model, name, Int8LinearFloatOutput.from_wrapper(wrapper))
                tq.convert(model, mapping=_INT8_MODULES, inplace=True)
            if self.tables and self.cfg.method != "qat":  # QAT's table is converted above
                tables = {name: tq.float_qparams_weight_only_qconfig for name in self.tables}
                tq.quantize_dynamic(model, tables, mapping={nn.Embedding: nnq.Embedding}, inplace=True)
        return model

    def qdq_unavailable(self) -> str | None:
        if self.cfg.method == "ptq_dynamic":
            return "ptq_dynamic quantizes activations per call: ONNX Runtime's own dynamic INT8 is its counterpart"
        return None

    def qdq_model(self, prepared: nn.Module) -> nn.Module:
        return to_qdq(prepared, embeddings_int8=self.cfg.embeddings == "int8")

    def count_quantized(self, model: nn.Module) -> int:
        kinds = (nnq.Linear, nnq.Embedding, nnqd.Linear)
        return sum(isinstance(m, kinds) for m in model.modules())
