#!/usr/bin/env bash
# Verify qatflash's CUDA paths on a GPU machine, from the repo root: CUDA-event timing, bf16 autocast,
# the SDPA flash kernel (forced), the flash_attention_2 refusal/usage, and eager vs SDPA latency.
# Prints a table of results.json figures; full job folders land in ${OUT:-/tmp/gpu_check}.
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"

python3 -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tail -3

# Train tiny_bert on the synthetic task in bf16 on the GPU with each attention, then time the
# forward at batch 32 x 512 tokens (where attention matters).
common=(trainer=gpu logger=csv benchmark.batch_size=32 benchmark.seq_len=512 benchmark.min_duration_s=2)
for attn in eager sdpa sdpa_flash flash_attention_2; do
  python3 -m qatflash "${common[@]}" attention=$attn hydra.run.dir="$OUT/$attn" 2>"$OUT/$attn.err" >/dev/null
  echo "attention=$attn exit=$? $(grep -h '^qatflash: error' "$OUT/$attn.err")"
done
# Refusals only a GPU can show: forced kernels missing in fp32, and CUDA's flash kernel (which takes
# no mask) with padded batches (synthetic sentences are 62 tokens; fixed-length evaluation pads to 128).
refuse() {
  local name=$1; shift
  python3 -m qatflash trainer=gpu logger=none trainer.max_epochs=1 benchmark=none "$@" hydra.run.dir="$OUT/$name" \
    >/dev/null 2>"$OUT/$name.err"
  echo "$name exit=$? $(grep -h '^qatflash: error' "$OUT/$name.err")"
}
for backend in flash efficient cudnn math; do
  refuse "fp32_$backend" trainer.precision=32-true attention=sdpa attention.sdpa_backend=$backend
done
refuse padded_flash attention=sdpa_flash data.max_length=128 data.eval_padding=max_length

python3 - "$OUT" <<'PY'
import json, sys, pathlib
print(f"{'run':<22}{'status':<8}{'test/acc':>9}{'p50 ms':>9}{'p90 ms':>9}{'rel sd':>8}  timer        device")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/results.json")):
    r = json.loads(f.read_text()); lat = (r["latency"] or [{}])[0]
    print(f"{f.parent.name:<22}{r['status']:<8}{r['metrics'].get('test/acc', float('nan')):>9.4f}"
          f"{lat.get('p50_ms', float('nan')):>9.3f}{lat.get('p90_ms', float('nan')):>9.3f}{lat.get('rel_stdev', float('nan')):>8.3f}"
          f"  {lat.get('timer', '-'):<12} {r['env'].get('device_name')}")
PY
