#!/usr/bin/env bash
# Device call 2 (`cd devwt && bash benchmarks/results/gpu14c/call2.sh`): the round trip A/B in one call,
# hot path, the fill of before against the lean fill, early results with the device-written done flag,
# and the lean fill with timing events. Packed into $OUT/res.tgz.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
GRAPHS_TIMEOUT=30 ITERS=20 VARIANTS="old-direct:1:1:1:0:--direct:1 lean-direct:1:1:1:0:--direct:1:ASAP_GPU_LEAN_FILL=1 early-done-direct:1:1:1:0:--direct:1:ASAP_GPU_LEAN_FILL=1,ASAP_GPU_HOST_FREE=1,ASAP_GPU_DEVICE_DONE=1 lean-direct-timed:1:1:1:1:--direct:1:ASAP_GPU_LEAN_FILL=1" \
  timeout 135 bash benchmarks/gpu_fast14.sh graphs 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
