#!/usr/bin/env bash
# Device call 5 of 2026-12-02 (third stop), `bash benchmarks/results/s28/call5.sh`, carry [".whl"] (with the
# py-spy wheel added): where the attention host's post goes on the hot path (early results, fused step,
# 1k tokens, 15000 round trips), sampled by py-spy at ~1 kHz (non-blocking) with thread names, raw collapsed stacks.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
mps_dir=$(mktemp -d /tmp/asap-mps.XXXX)
export CUDA_MPS_PIPE_DIRECTORY=$mps_dir/pipe CUDA_MPS_LOG_DIRECTORY=$mps_dir/log CUDA_MODULE_LOADING=EAGER
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d
{
  ls /tmp/site/bin
  env ASAP_GPU_STEP_GRAPHS=1 ASAP_GPU_ARMED_STEPS=1 ASAP_GPU_HOT_PATH=1 ASAP_GPU_PREFETCH=1 ASAP_GPU_LEAN_FILL=1 \
      ASAP_GPU_HOST_FREE=1 ASAP_GPU_DEVICE_DONE=1 timeout -k 10 150 /tmp/site/bin/py-spy record -r 997 -f raw --threads --nonblocking \
      -o $OUT/post.txt -- python3 benchmarks/gpu_dataplane.py --planes fast --direct --iters 15000 --tokens 1024 \
      --json $OUT/post.json 2>&1 | grep -v '^ *[]}"{]' | tail -8
  wc -l $OUT/post.txt
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
echo quit | timeout 20 nvidia-cuda-mps-control
tar czf $REAL/res.tgz -C /tmp o
