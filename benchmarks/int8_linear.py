"""One Linear layer in FP32 and INT8 on this CPU: speed per engine, and where int16 sums saturate.

What bounds a whole model's INT8 speed-up is first its Linears' own: this times one Linear of
MiniLM's shape (128 tokens x 384 -> 1536 by default) in FP32 and as torch.ao dynamic and static
INT8 (static with the quantize/dequantize around it that each QuantWrapper adds, and static with
float output, `quant.linear_output=float`, where the engine has that kernel), alternating
the variants in rounds so that a drifting host load moves them alike. It then checks the static
kernel against exact integer arithmetic for three range choices: without VNNI, fbgemm adds pairs
of uint8 x int8 products in int16, which saturates unless activations (reduce_range) or weights
(7-bit) give up a bit. Run on demand:

    python benchmarks/int8_linear.py --threads 2
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd

from qatflash.config import TimingConfig
from qatflash.quant.eager import FLOAT_OUTPUT_ENGINES
from qatflash.quant.float_output import Int8LinearFloatOutput
from qatflash.timing.latency import time_in_rounds


def _static_linear(weight: torch.Tensor, weight_max: int, out_scale: float, out_zero: int) -> nnq.Linear:
    scales = weight.abs().amax(1) / weight_max
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    clamped = weight.clamp(-(weight_max + 1) * scales[:, None], weight_max * scales[:, None])
    linear = nnq.Linear(weight.shape[1], weight.shape[0])
    linear.set_weight_bias(torch.quantize_per_channel(clamped, scales, zeros, 0, torch.qint8), None)
    linear.scale, linear.zero_point = out_scale, out_zero
    return linear


def speed(engine: str, tokens: int, features: tuple[int, int], rounds: int) -> None:
    torch.backends.quantized.engine = engine
    fan_in, fan_out = features
    x = torch.randn(1, tokens, fan_in)
    fp32 = torch.nn.Linear(fan_in, fan_out)
    dynamic = nnqd.Linear(fan_in, fan_out)
    scales = fp32.weight.abs().amax(1) / 127
    zeros = torch.zeros(fan_out, dtype=torch.long)
    dynamic.set_weight_bias(torch.quantize_per_channel(fp32.weight, scales, zeros, 0, torch.qint8), fp32.bias)
    static = _static_linear(fp32.weight.detach(), 63, 0.05, 128)
    x_scale = float(x.abs().max()) / 127
    variants = {
        "fp32": lambda: fp32(x),
        "int8 dynamic": lambda: dynamic(x),
        "int8 static + q/dq": lambda: static(
            torch.quantize_per_tensor(x, x_scale, 128, torch.quint8)
        ).dequantize(),
    }
    if engine in FLOAT_OUTPUT_ENGINES:
        float_output = Int8LinearFloatOutput(fan_in, fan_out)
        float_output.set_weight_bias(static.weight(), None)
        float_output.scale, float_output.zero_point = x_scale, 128
        variants["int8 static, float out"] = lambda: float_output(x)
    block = 10
    timing = TimingConfig(warmup=block, min_iters=rounds * block, min_duration_s=0, block_iters=block)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        results = time_in_rounds({name: (step, cpu) for name, step in variants.items()}, timing, tokens)
    for name, result in results.items():
        ratio = result.ratio_to(results["fp32"])["ratio"]
        print(f"{engine:7s} {name:24s} p50 {result.stats.p50_ms:7.3f} ms   paired ratio to fp32 {ratio:.2f}")


def saturation(engine: str, tokens: int, features: tuple[int, int]) -> None:
    """Worst error of the static kernel against the same quantized operands multiplied exactly."""
    torch.backends.quantized.engine = engine
    torch.manual_seed(0)
    fan_in, fan_out = features
    x = torch.rand(tokens, fan_in) * 6 - 1  # post-GELU-like: mostly positive, a long upper tail
    weight = torch.randn(fan_out, fan_in) * 0.05
    for label, act_max, weight_max in (
        ("uint8 0..127 (reduce_range) x int8 -128..127", 127, 127),
        ("uint8 0..255 x int8 -128..127", 255, 127),
        ("uint8 0..255 x int7 -64..63", 255, 63),
    ):
        scale = float(x.max() - x.min()) / act_max
        qx = torch.quantize_per_tensor(x, scale, round(-float(x.min()) / scale), torch.quint8)
        probe = _static_linear(weight, weight_max, 1.0, 0)
        exact = qx.dequantize() @ probe.weight().dequantize().t()
        out_scale = float(exact.max() - exact.min()) / 255
        linear = _static_linear(weight, weight_max, out_scale, round(-float(exact.min()) / out_scale))
        worst = float((linear(qx).dequantize() - exact).abs().max()) / out_scale
        print(f"{engine:7s} {label:46s} worst error {worst:5.1f} output steps (0.5 = rounding only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--features", type=int, nargs=2, default=(384, 1536), metavar=("IN", "OUT"))
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
    engines = [e for e in ("x86", "fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads"
    )
    for engine in engines:
        speed(engine, args.tokens, tuple(args.features), args.rounds)
    for engine in engines:
        saturation(engine, args.tokens, tuple(args.features))


if __name__ == "__main__":
    main()
