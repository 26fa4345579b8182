#!/usr/bin/env bash
# Device call 6 of 2026-12-02 (third stop), `bash benchmarks/results/s28/call6.sh`, carry [".whl"]: where the
# attention host's post goes on the hot path (early results, fused step, 1k tokens, 500 round trips), from
# cProfile on the posting thread (--profile-post; py-spy, call 5, fell behind and sampled start-up only).
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
  env ASAP_GPU_STEP_GRAPHS=1 ASAP_GPU_ARMED_STEPS=1 ASAP_GPU_HOT_PATH=1 ASAP_GPU_PREFETCH=1 ASAP_GPU_LEAN_FILL=1 \
      ASAP_GPU_HOST_FREE=1 ASAP_GPU_DEVICE_DONE=1 timeout -k 10 120 python3 benchmarks/gpu_dataplane.py --planes fast \
      --direct --iters 500 --tokens 1024 --profile-post $OUT/post_profile.txt --json $OUT/post.json 2>&1 \
      | grep -v '^ *[]}"{]' | tail -4
  head -60 $OUT/post_profile.txt
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
echo quit | timeout 20 nvidia-cuda-mps-control
tar czf $REAL/res.tgz -C /tmp o
