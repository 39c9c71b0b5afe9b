"""Where a forward's time goes, FP32 against the INT8 model a training run shipped: torch.profiler's
self CPU time per op family, over the same inputs, in the same process.

The INT8/FP32 ratio of a whole model is bounded by the part INT8 kernels replace: if Linears are a
share s of FP32's forward and run at r of FP32 there, the rest staying float, the model can reach
about r·s + (1 − s). This script measures s, r and the rest instead of assuming them.

    python benchmarks/int8_breakdown.py <run folder with an INT8 artifact> [--threads 1] [--iters 30]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from qatflash.bench.saved_run import open_run
from qatflash.config import AttentionConfig
from qatflash.models import build_model_from_config
from qatflash.quant import make_recipe
from qatflash.timing.latency import token_inputs

# Op-name fragments of each family, first match wins; "linear" covers FP32 (addmm, linear, mm)
# and INT8 (quantized::linear*, fbgemm's float-output kernel) alike.
FAMILIES = [
    ("linear", ("linear", "addmm", "aten::mm", "matmul_with")),
    ("attention", ("scaled_dot_product", "attention", "bmm", "softmax")),
    ("quantize / dequantize", ("quantize_per", "dequantize", "fake_quant")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("embedding", ("embedding",)),
]


def family(name: str) -> str:
    return next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other (adds, views, dispatch)")


def breakdown(model: torch.nn.Module, inputs: dict[str, torch.Tensor], iters: int) -> dict[str, float]:
    """Self CPU milliseconds per forward in each family, and `total`."""
    with torch.inference_mode():
        for _ in range(5):
            model(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(**inputs)
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[family(event.key)] += event.self_cpu_time_total / 1000 / iters
    out["total"] = sum(out.values())
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = open_run(args.run)
    attention = AttentionConfig(implementation="sdpa")
    int8 = run.load_int8(make_recipe(run.quant), attention).eval()
    fp32 = build_model_from_config(run.hf_config(), attention).eval()
    inputs = token_inputs(1, args.seq_len, run.hf_config().vocab_size)
    measured = {"fp32": breakdown(fp32, inputs, args.iters), "int8": breakdown(int8, inputs, args.iters)}
    print(
        f"batch 1 x {args.seq_len}, {args.threads} thread(s), {args.iters} forwards each, self CPU ms/forward"
    )
    print(f"{'family':32s} {'FP32':>8s} {'share':>6s} {'INT8':>8s} {'INT8/FP32':>9s}")
    total = measured["fp32"]["total"]
    for name in [*(f for f, _ in FAMILIES), "other (adds, views, dispatch)", "total"]:
        a, b = measured["fp32"].get(name, 0.0), measured["int8"].get(name, 0.0)
        ratio = f"{b / a:9.2f}" if a > 0 else f"{'-':>9s}"
        print(f"{name:32s} {a:8.2f} {a / total:6.1%} {b:8.2f} {ratio}")
    share = measured["fp32"]["linear"] / total
    linear_ratio = measured["int8"]["linear"] / measured["fp32"]["linear"]
    print(
        f"Linears: {share:.1%} of FP32's forward, INT8 Linears at {linear_ratio:.2f} of FP32's; "
        f"the rest INT8/FP32 {(measured['int8']['total'] - measured['int8']['linear']) / (total - measured['fp32']['linear']):.2f}; "
        f"whole forward {measured['int8']['total'] / total:.2f}"
    )


if __name__ == "__main__":
    main()
