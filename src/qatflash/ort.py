"""The `onnxruntime` backend: the FP32 model exported to ONNX, and ONNX Runtime's dynamic INT8 of it.

ONNX Runtime is the deployment baseline our users compare against, so its INT8 is the one it makes
itself (`quantize_dynamic`: int8 weights, activations quantized per call, embeddings included), from
the same FP32 model the torch rows time. The torch.ao and torchao INT8 models cannot be exported
(packed parameters, tensor subclasses), which is why the INT8 ONNX model is quantized from FP32 and
labelled so. Sessions run on the CPU with as many intra-op threads as torch uses, on the same
inputs. The package is an optional extra (`pip install -e '.[onnx]'`).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from qatflash.errors import ConfigError

# How the INT8 ONNX model was made, recorded on its rows.
ORT_INT8_METHOD = "onnxruntime.quantization.quantize_dynamic (from the FP32 export)"
# Every setting of that quantization spelled out, so that what results.json records is what ran:
# int8 weights with one scale per tensor over the full range, uint8 activations quantized per call,
# the op types ONNX Runtime quantizes by default (MatMul/Gemm, and Gather: the embedding tables).
ORT_INT8_SETTINGS = {
    "per_channel": False,
    "reduce_range": False,
    "weight_type": "QInt8",
    "activation_type": "QUInt8 (DynamicQuantizeLinear, per call)",
    "op_types_to_quantize": None,
}
_WEIGHT_MATMULS = ("MatMul", "Gemm")
_PACKAGES = ("onnxruntime", "onnxscript", "onnx")


def check_onnxruntime() -> None:
    """Refuse the backend up front when the optional extra is not installed."""
    missing = [name for name in _PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"benchmark.backends includes onnxruntime, but {missing} are not installed; "
            "install the extra with: pip install -c constraints.txt -e '.[onnx]'"
        )


def export_onnx(model: nn.Module, path: Path, example: dict[str, torch.Tensor], max_len: int | None) -> int:
    """Export `model` (CPU, FP32) with dynamic batch and length up to `max_len`; returns the file's size in bytes."""
    model = model.eval()
    example = {k: v.cpu() for k, v in example.items()}
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("seq", min=2, max=max_len)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (),
            kwargs=example,
            dynamo=True,
            verbose=False,
            input_names=list(example),
            output_names=["logits"],
            dynamic_shapes={name: dims for name in example},
        )
        program.save(str(path))  # one file: weights are embedded below ONNX's 2 GB protobuf limit
    return path.stat().st_size


def quantize_onnx(fp32_path: Path, int8_path: Path, op_types: list[str] | None = None) -> int:
    """ONNX Runtime's dynamic INT8 of an exported model (`ORT_INT8_SETTINGS`; `op_types` narrows what it
    quantizes); returns the file's size in bytes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        op_types_to_quantize=op_types,
        per_channel=ORT_INT8_SETTINGS["per_channel"],
        reduce_range=ORT_INT8_SETTINGS["reduce_range"],
        weight_type=QuantType[ORT_INT8_SETTINGS["weight_type"]],
    )
    return int8_path.stat().st_size


def weight_matmul_coverage(fp32_path: Path, int8_path: Path) -> dict[str, int]:
    """How many of the FP32 export's weight matmuls (MatMul/Gemm by an initializer) run as INT8 in the
    quantized model: a MatMulInteger of a DynamicQuantizeLinear output and an int8 initializer.

    The check that ONNX Runtime's INT8 is INT8 where the work is: a graph that quantized only the
    embedding tables would be a quarter of the size and still run every matmul in float.
    """
    import onnx

    def weight_nodes(path: Path) -> tuple[list[onnx.NodeProto], dict[str, int], set[str]]:
        graph = onnx.load(str(path)).graph
        initializers = {t.name: t.data_type for t in graph.initializer}
        dynamic = {
            out for node in graph.node if node.op_type == "DynamicQuantizeLinear" for out in node.output
        }
        return list(graph.node), initializers, dynamic

    nodes, initializers, _ = weight_nodes(fp32_path)
    weights = sum(n.op_type in _WEIGHT_MATMULS and n.input[1] in initializers for n in nodes)
    nodes, initializers, dynamic = weight_nodes(int8_path)
    int8 = onnx.TensorProto.INT8
    quantized = sum(
        n.op_type == "MatMulInteger" and n.input[0] in dynamic and initializers.get(n.input[1]) == int8
        for n in nodes
    )
    left_float = sum(n.op_type in _WEIGHT_MATMULS and n.input[1] in initializers for n in nodes)
    return {"weight_matmuls": weights, "int8": quantized, "float": left_float}


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the HF forward signature, so the same test loop and timer run it.

    It holds no parameters: Lightning's test loop and `measure_forward_latency` see a model whose
    forward takes `input_ids` and `attention_mask` and returns `.logits`, computed by ONNX Runtime.
    """

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, **inputs: torch.Tensor) -> SequenceClassifierOutput:
        feed = {name: inputs[name].cpu().numpy() for name in self.input_names}
        return SequenceClassifierOutput(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))
