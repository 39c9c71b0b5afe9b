#!/usr/bin/env bash
# The decoder-LM GPU check, in priority order, for one H100/H200 and about 15 minutes (run from the
# repo root; bitsandbytes is the only extra carried, about 43 MB). Each step has its own time limit
# so a slow one cannot starve the next; figures land in ${OUT:-/tmp/gpu_llm_check} and a summary
# table is printed at the end.
#   1. bf16 training of llama_tiny at 4k and 16k tokens per block with SDPA's flash kernel
#      (and flash_attention_2 where flash-attn imports);
#   2. llm_attention_scaling to 32k: eager vs SDPA vs SDPA flash, prefill and decode, bf16;
#   3. decode tokens/s: FP16 against torchao int8 weight-only and bitsandbytes int8 / NF4.
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_llm_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step() {  # step <name> <seconds> <command...>
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name exit=$? $((SECONDS - started)) s $(grep -h '^qatflash: error' "$OUT/$name.log" | head -1)"
}

# 1. Training at long context: packed blocks carry no padding, so the flash kernel trains.
train=(task=causal_lm model=llama_tiny data=wikitext2 trainer=gpu logger=csv trainer.max_steps=60
       data.batch_size=1 benchmark.new_tokens=32 benchmark.min_duration_s=2)
for length in 4096 16384; do
  step "train_sdpa_flash_L$length" 240 python3 -m qatflash "${train[@]}" attention=sdpa_flash \
    data.max_length=$length hydra.run.dir="$OUT/train_sdpa_flash_L$length"
done
if python3 -c "import flash_attn" 2>/dev/null; then
  step train_fa2_L16384 240 python3 -m qatflash "${train[@]}" attention=flash_attention_2 \
    data.max_length=16384 hydra.run.dir="$OUT/train_fa2_L16384"
fi

# 2. Attention scaling to 32k, bf16 (eager past its memory is a recorded out-of-memory point).
step attention_scaling 300 python3 -m qatflash.bench -m experiment=llm_attention_scaling \
  bench.device=cuda bench.dtype=bfloat16 'bench.seq_lens=[1024,4096,16384,32768]' bench.max_memory_gb=60 \
  attention=eager,sdpa,sdpa_flash hydra.sweep.dir="$OUT/attention_scaling"

# 3. Weight-only decode against FP16 on the 125M decoder (each point pairs it with its FP16 twin).
step decode_weight_only 240 python3 -m qatflash.bench -m experiment=llm_decode_weight_only \
  bench.device=cuda bench.dtype=float16 quant=wo_torchao_int8,wo_bnb_int8,wo_bnb_nf4 \
  hydra.sweep.dir="$OUT/decode_weight_only"

python3 - "$OUT" <<'PY'
import json, pathlib, sys
print(f"{'point':<58}{'status':<8}{'prefill ms':>11}{'decode ms':>10}{'tok/s':>8}{'x float':>8}{'peak MiB':>9}")
for f in sorted(pathlib.Path(sys.argv[1]).rglob("results.json")):
    r = json.loads(f.read_text())
    for row in r.get("latency") or [{}]:
        name = f"{f.parent.name} L{row.get('seq_len')} {row.get('attention', '')} {row.get('variant', '')}"
        ratio = row.get("ratio_to_float", row.get("ratio_to_fp32"))
        print(f"{name:<58}{row.get('status', r['status']):<8}{row.get('prefill_p50_ms', float('nan')):>11.2f}"
              f"{row.get('p50_ms', float('nan')):>10.3f}{row.get('tokens_per_s', float('nan')):>8.1f}"
              f"{ratio if ratio is not None else float('nan'):>8.2f}{row.get('peak_memory_bytes', 0) / 2**20:>9.0f}")
PY
