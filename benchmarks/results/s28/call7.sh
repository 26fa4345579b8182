#!/usr/bin/env bash
# Device call 7 of 2026-12-02 (third stop): the host's post trimmed (the hot path's lean fill copies with
# no stream switch, the batch-write parameters kept per slot) against the tree before (b8a8c2c, unpacked in
# devwt/), alternating twice: early results + fused step, and the hot path's defaults + fused step, each
# host-timed and with the host ahead. `cp -r .whl devwt/ && bash benchmarks/results/s28/call7.sh`, carry
# [".whl", "devwt"].
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
here=$PWD
EARLY=ASAP_GPU_LEAN_FILL=1,ASAP_GPU_HOST_FREE=1,ASAP_GPU_DEVICE_DONE=1
{
  for round in 1 2; do
    for tree in before after; do
      dir=$here; [ $tree = before ] && dir=$here/devwt
      echo "##### $tree ($round) $(date -u +%T)"
      OUT=$OUT/$tree$round DATAPLANE_ARGS="--host-ahead-us 2000" GRAPHS_TIMEOUT=45 ITERS=30 \
        VARIANTS="early-fused:1:1:1:0:--direct:1:$EARLY direct-fused:1:1:1:0:--direct:1" \
        timeout -k 10 100 bash $dir/benchmarks/gpu_fast14.sh graphs 2>&1 | grep -E "^---|tokens:" | grep -v hops
    done
  done
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
