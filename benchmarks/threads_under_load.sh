#!/usr/bin/env bash
# The measurement behind benchmark.threads' CPU default: MiniLM's forward (batch 1 x 128 tokens,
# qatflash-bench, one fresh process per point) at 1 and 2 threads, on a quiet host and beside one
# competing busy process, as a second tenant of a shared VM would be. Prints p50, p90, relative
# stdev and the host load each row recorded. Usage: bash benchmarks/threads_under_load.sh [out dir]
set -euo pipefail
out=${1:-/tmp/qatflash_threads}
rm -rf "$out"
for load in quiet loaded; do
  competitor=
  if [ "$load" = loaded ]; then
    python3 -c "while True: pass" & competitor=$!
  fi
  for threads in 1 2; do
    qatflash-bench model=minilm 'bench.seq_lens=[128]' benchmark.threads=$threads \
      benchmark.min_duration_s=8 logger=none hydra.run.dir="$out/$load-t$threads" >/dev/null 2>&1
  done
  [ -n "$competitor" ] && kill "$competitor"
done
python3 - "$out" <<'PY'
import json, pathlib, sys
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    row = json.loads((run / "results.json").read_text())["latency"][0]
    print(f"{run.name:10s} threads={row['threads']} p50={row['p50_ms']:.1f} ms p90={row['p90_ms']:.1f} ms "
          f"rel_stdev={row['rel_stdev']:.2f} other_cpu={row['host_other_cpu']:.2f} busy={row['host_busy']}")
PY
