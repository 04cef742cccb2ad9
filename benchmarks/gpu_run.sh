#!/usr/bin/env bash
# The GPU checks of issue 22, in two stages that fit a 15-minute device budget with room for a rerun.
# One H100/H200 whose image has torch (2.11), CUDA and no package index; from the project root, with
# .whl/ holding a copy of ../shared/gpu (its wheels/ = what the image lacks: deepspeed, pydantic,
# timm, webdataset, ...; cp -r ../shared/gpu .whl, carried to the machine as an ignored path):
#   RESULTS_DIR=$OUT bash benchmarks/gpu_run.sh 1   # ~5 min: coatnet_0 production step vs plain vs
#                                                   # roofline + profile, attention layer bf16, table
#                                                   # gradients per backend, ours vs timm compiled
#   RESULTS_DIR=$OUT bash benchmarks/gpu_run.sh 2   # ~5 min: coatnet_3 the same; engine.compile() breaks
# Each step is capped by what is left of BUDGET seconds; summary.txt collects the tables.
set -u
STAGE=${1:-1}
O=${RESULTS_DIR:-/tmp/gpu-results}; mkdir -p "$O"; S="$O/summary.txt"
BUDGET=${BUDGET:-300}
T0=$SECONDS
if [ -d .whl/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/wheels/*.whl \
    || { echo "pip install of .whl/wheels failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/tx \
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch,triton,timm,deepspeed; print('torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__,'timm',timm.__version__,'ds',deepspeed.__version__)" 2>&1 | tail -1
} | tee -a "$S"

run() {  # run FILE CAP CMD...: output to $O/FILE, capped by the budget left; tables to $S
  local f=$1 cap=$2; shift 2
  local left=$(( BUDGET - (SECONDS - T0) )) s=$SECONDS rc
  if (( left < 25 )); then echo "SKIP $* (budget spent)" | tee -a "$S"; return; fi
  (( cap > left )) && cap=$left
  echo "### $*" >>"$O/$f"
  timeout -k 5 "$cap" "$@" >>"$O/$f" 2>&1; rc=$?
  echo "== rc=$rc $((SECONDS - s))s/cap ${cap}s: $*" | tee -a "$S"
  tail -n 60 "$O/$f" | grep -aE '^\| |GMACs|bias tables|saved activations|"device"|Error' | cut -c1-400 | tee -a "$S"
}

B=benchmarks
if [ "$STAGE" = 1 ]; then
  run zero3_c0.txt 120 python3 $B/zero3_step.py --modes plain,ds,ds_blocks --variant coatnet_0 --batch 128 --profile
  run attn.txt 45 python3 $B/attn_layer.py --device cuda --shapes c0_S3,c3_S3 --backends math,sdpa,flex
  run gpu_check.txt 40 python3 $B/gpu_check.py --batch 8 --backends sdpa,flex+compile,math
  run model_step_c0.txt 100 python3 $B/model_step.py --device cuda --dtype bf16 --compile --variant coatnet_0 --batch 256 --runs 5
else
  run zero3_c3.txt 130 python3 $B/zero3_step.py --modes plain,ds_blocks --variant coatnet_3 --batch 128 --profile
  run model_step_c3.txt 110 python3 $B/model_step.py --device cuda --dtype bf16 --compile --variant coatnet_3 --batch 128 --runs 5
  run zero3_engine.txt 60 python3 $B/zero3_step.py --modes ds_engine --variant coatnet_0 --batch 128 --runs 3
fi
echo "stage $STAGE total $((SECONDS - T0))s of budget $BUDGET s" | tee -a "$S"
