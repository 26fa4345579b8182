#!/usr/bin/env bash
# Device call 2 of 2026-12-02 (third stop), `bash benchmarks/results/s28/call2.sh`, carry [".whl"]:
# (1) the hot path's round trip with the host ahead, now with the gate's event as the dispatch's ready
#     event (as an attention rank's dispatch carries it), fused step against torch-op step, defaults and
#     early results; then the event loop's exchange (the serving default), host-timed, fused against torch-op;
# (2) the 1+1 cluster on one GPU held at saturation with NO batch flag (the GPU clusters' default bound),
#     nvidia-smi sampled every 100 ms, then the monolithic process over the same prompts at 16384.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
EARLY=ASAP_GPU_LEAN_FILL=1,ASAP_GPU_HOST_FREE=1,ASAP_GPU_DEVICE_DONE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu,clocks.sm,power.draw --format=csv
  echo "=== round trip, hot path, host ahead $(date -u +%T)"
  DATAPLANE_ARGS="--host-ahead-us 2000" GRAPHS_TIMEOUT=45 ITERS=20 VARIANTS="direct-torch:1:1:1:0:--direct:1:ASAP_GPU_FUSED_STEP=0 \
direct-fused:1:1:1:0:--direct:1 early-torch:1:1:1:0:--direct:1:$EARLY,ASAP_GPU_FUSED_STEP=0 early-fused:1:1:1:0:--direct:1:$EARLY" \
      timeout -k 10 200 bash benchmarks/gpu_fast14.sh graphs 2>&1 | grep -E "^---|tokens:" | grep -v hops
  echo "=== round trip, event loop exchange $(date -u +%T)"
  GRAPHS_TIMEOUT=45 ITERS=20 VARIANTS="armed-torch:1:1:0:0::1:ASAP_GPU_FUSED_STEP=0 armed-fused:1:1:0:0::1" \
      timeout -k 10 100 bash benchmarks/gpu_fast14.sh graphs 2>&1 | grep -E "^---|tokens:" | grep -v hops
  echo "=== 1+1, default batch bound (no --max-batch-tokens) $(date -u +%T)"
  nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/default_util.csv" &
  smi=$!
  timeout -k 10 80 python3 benchmarks/gpu_headline.py --out "$OUT" --name default --attention 1 --experts 1 \
      --modes async --sweep 240,240 --requests 480 --slo-ttft-ms 1200 --budget-s 75 2>&1 | grep -E "^async |GPU0" | tail -3
  kill $smi
  python3 benchmarks/gpu_util_window.py "$OUT/default_util.csv" "$OUT/default.log"
  grep -h -o "expert rank 0: [0-9]* chunks in [0-9]* calls" "$OUT/default.log" | tail -1
  grep -h -o "data plane[^\"]*" "$OUT/default.log" | sort | uniq -c | head -2
  echo "=== monolithic over default's prompts $(date -u +%T)"
  timeout -k 10 100 python3 benchmarks/gpu_monolithic.py --out "$OUT" --name mono --bench-json "$OUT/default.json" \
      --max-batch-tokens 16384 --repeats 2 2>&1 | grep -E "pass [0-9]|tokens/s" | tail -3
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
