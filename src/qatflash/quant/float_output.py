"""INT8 Linears that return float: `quant.linear_output=float`.

torch.ao's eager INT8 Linear rounds its output to uint8 with an observed scale, and in a transformer
the next op (LayerNorm, GELU, attention) runs in float, so a dequantize follows at once: two more
passes over the activations per Linear, and a rounding that only adds error. fbgemm has one kernel
that quantizes the float input with fixed qparams, runs the int8 GEMM and writes float output
(`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`). With it, quantization is what it
must be for an int8 GEMM (input and weights) and nothing more, and QAT trains against exactly that:
the Linear's output gets no fake quantization.
"""

from __future__ import annotations

import torch
from torch.ao import quantization as tq
from torch.ao.nn import quantized as nnq


class Int8LinearFloatOutput(nnq.Linear):
    """Float in, float out, int8 inside. `scale` and `zero_point` are the *input's* qparams.

    nnq.Linear keeps one pair of qparams, its output's; this subclass reads them as its input's, so
    the state_dict is nnq.Linear's (and loads with `weights_only=True` like every INT8 artifact).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, self.scale, self.zero_point, self._packed_params._packed_params
        )

    def _get_name(self) -> str:
        return "QuantizedLinearFloatOutput"

    @classmethod
    def from_wrapper(cls, wrapper: tq.QuantWrapper) -> Int8LinearFloatOutput:
        """Convert a prepared QuantWrapper (input quantizer, Linear whose output was never quantized)."""
        linear = wrapper.module
        # nnq.Linear.from_float reads its qparams from `activation_post_process`: hand it the input's.
        linear.activation_post_process = wrapper.quant.activation_post_process
        return cls.from_float(linear)
