#!/usr/bin/env bash
# Final device call of 2026-12-02 on the merged tree (`bash benchmarks/results/s26/final.sh`, carry [".whl"]):
# (1) the 1+1 cluster on one GPU held at saturation (sweep 240,240, 480 requests per rate) with the
#     scheduler's default batches (8192 tokens) and with --max-batch-tokens 16384, back to back, nvidia-smi
#     sampled every 100 ms for each; then the monolithic process over the same prompts at its own 16384;
# (2) tests/gpu (the early-results test deselected: it ran alone in call 3 of gpu14d), bounded by the time left.
# Everything lands in /tmp/o, packed into $OUT/res.tgz at the end.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
sat() {  # name extra-args...
    local name=$1; shift
    echo "=== $name ($*) $(date -u +%T)"
    nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/${name}_util.csv" &
    local smi=$!
    timeout -k 10 80 python3 benchmarks/gpu_headline.py --out "$OUT" --name "$name" --attention 1 --experts 1 \
        --modes async --sweep 240,240 --requests 480 --slo-ttft-ms 1200 --budget-s 75 "$@" 2>&1 | grep -E "^async |GPU0" | tail -3
    kill $smi
    python3 benchmarks/gpu_util_window.py "$OUT/${name}_util.csv" "$OUT/$name.log"
    grep -h -o "data plane[^\"]*" "$OUT/$name.log" | sort | uniq -c | head -2
    grep -h -o "expert rank 0: [0-9]* chunks in [0-9]* calls" "$OUT/$name.log" | tail -1
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu,clocks.sm,power.draw --format=csv
  python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda.bindings', cuda.bindings.__version__)"
  sat b8192
  sat b16384 --max-batch-tokens 16384
  echo "=== monolithic over b8192's prompts $(date -u +%T)"
  timeout -k 10 100 python3 benchmarks/gpu_monolithic.py --out "$OUT" --name mono --bench-json "$OUT/b8192.json" \
      --max-batch-tokens 16384 --repeats 2 2>&1 | grep -E "pass [0-9]|tokens/s" | tail -3
  left=$(( ${TESTS_BUDGET_S:-560} - SECONDS ))
  echo "=== tests/gpu with ${left} s left $(date -u +%T)"
  if (( left > 120 )); then
    TESTS="tests/gpu --ignore=tests/gpu/test_nixl_gpu.py --deselect tests/gpu/test_gpu_fast.py::test_hot_path_early_results_and_fills_match_grpc" \
      TESTS_TIMEOUT=$left TESTS_LOG=gpu_tests OUT=$OUT bash benchmarks/gpu_fast14.sh tests 2>&1 | tail -30
  fi
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
