#!/usr/bin/env bash
# Device call 1 of 2026-12-02 (third stop), `bash benchmarks/results/s28/call1.sh`, carry [".whl"]:
# (1) tests/gpu/test_gpu_graph.py: the captured step, fused (Triton prologue, results in place) and torch-op,
#     each bitwise equal to the eager step;
# (2) the fast plane's per-layer round trip on the hot path, host-timed and with the host ahead
#     (--host-ahead-us 2000: device-side), the fused step against the torch-op one (ASAP_GPU_FUSED_STEP=0),
#     alternating, with early results + lean fill + device done flag and with the hot path's defaults,
#     then each once with device timing events (the armed step's time: gpu_flag_to_done).
# Everything lands in /tmp/o, packed into $OUT/res.tgz at the end.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
EARLY=ASAP_GPU_LEAN_FILL=1,ASAP_GPU_HOST_FREE=1,ASAP_GPU_DEVICE_DONE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu,clocks.sm,power.draw --format=csv
  python3 -c "import torch, triton, cuda.bindings; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda.bindings', cuda.bindings.__version__)"
  echo "=== test_gpu_graph $(date -u +%T)"
  CUDA_MODULE_LOADING=EAGER timeout -k 10 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_graph.py 2>&1 | tail -15
  echo "=== round trip $(date -u +%T)"
  DATAPLANE_ARGS="--host-ahead-us 2000" GRAPHS_TIMEOUT=45 ITERS=20 VARIANTS="early-torch:1:1:1:0:--direct:1:$EARLY,ASAP_GPU_FUSED_STEP=0 \
early-fused:1:1:1:0:--direct:1:$EARLY direct-torch:1:1:1:0:--direct:1:ASAP_GPU_FUSED_STEP=0 direct-fused:1:1:1:0:--direct:1 \
early-torch2:1:1:1:0:--direct:1:$EARLY,ASAP_GPU_FUSED_STEP=0 early-fused2:1:1:1:0:--direct:1:$EARLY \
early-torch-timed:1:1:1:1:--direct:1:$EARLY,ASAP_GPU_FUSED_STEP=0 early-fused-timed:1:1:1:1:--direct:1:$EARLY" \
      timeout -k 10 420 bash benchmarks/gpu_fast14.sh graphs 2>&1 | tail -80
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
