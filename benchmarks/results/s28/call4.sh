#!/usr/bin/env bash
# Device call 4 of 2026-12-02 (third stop), `bash benchmarks/results/s28/call4.sh`, carry [".whl"]: why the
# event loop's exchange (the serving default) is slower at 1k with the fused step (call 3: 0.69 / 0.92 ms
# against 0.48 / 0.42 ms torch-op): the same pair with device timing events, then with the expert's
# device-written done flag, then with the attention poll thread spinning 1 ms before it parks.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
{
  echo "=== round trip, event loop exchange $(date -u +%T)"
  GRAPHS_TIMEOUT=45 ITERS=30 VARIANTS="timed-torch:1:1:0:1::1:ASAP_GPU_FUSED_STEP=0 timed-fused:1:1:0:1::1 \
dd-torch:1:1:0:0::1:ASAP_GPU_DEVICE_DONE=1,ASAP_GPU_FUSED_STEP=0 dd-fused:1:1:0:0::1:ASAP_GPU_DEVICE_DONE=1 \
spin-torch:1:1:0:0::1:ASAP_GPU_POLL_SPIN_S=0.001,ASAP_GPU_FUSED_STEP=0 spin-fused:1:1:0:0::1:ASAP_GPU_POLL_SPIN_S=0.001" \
      timeout -k 10 300 bash benchmarks/gpu_fast14.sh graphs 2>&1 | grep -E "^---|tokens:"
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
