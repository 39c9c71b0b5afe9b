#!/usr/bin/env bash
# The GPU check: every CUDA path of qatflash and qatflash-bench on one H100/H200, within five
# minutes (steps and what each proves: benchmarks/gpu_check.py). Run from the repo root:
#   bash benchmarks/gpu_check.sh                           # every step, then one summary table
#   STEPS=attention_scaling,decode_weight_only bash benchmarks/gpu_check.sh   # only these
#   DRY_RUN=1 bash benchmarks/gpu_check.sh                 # compose and preflight every step, CUDA faked (CI)
# Settings: OUT (job folders and logs; default /tmp/gpu_check), DATA (the folder holding
# wikitext2/; default ../shared/data), PYTHON (default python3). Exits non-zero if any step failed.
#
# The lent GPU machine has no network, its own torch (2.11 when last seen), transformers and
# lightning, and runs this checkout without installing it (PYTHONPATH=src below). Carry the rest
# as Python 3.12 wheels, about 11 MiB, from here (the repo root) before the run:
#   echo /.whl/ >> .git/info/exclude; echo /.carry/ >> .git/info/exclude
#   plat='--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64'
#   python3 -m pip download --no-deps $plat -d .whl -c constraints.txt hydra-core omegaconf datasets \
#     dill multiprocess torchao submitit hydra-joblib-launcher hydra-submitit-launcher
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # the registry has only its source
#   python3 -m pip download --no-deps $plat -d /tmp/bnb bitsandbytes==0.50.2    # 43 MB; keep CUDA 13 + CPU:
#   (cd /tmp/bnb && unzip -q bitsandbytes-*.whl -d x && rm -f x/bitsandbytes/libbitsandbytes_cuda1[0-2]*.so \
#     && cd x && zip -qr ../bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl . ) && cp /tmp/bnb/*.whl .whl/
#   mkdir -p .carry && cp -r ../shared/data/wikitext2 .carry/
# then, on the device (carry .whl and .carry):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   DATA=.carry bash benchmarks/gpu_check.sh
# (pip may name the wheels' files differently; keep one version of each package: two stop the install.)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 WANDB_MODE=offline
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
if [ "${DRY_RUN:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__, 'cuda', torch.version.cuda)"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
