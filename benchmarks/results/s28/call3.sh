#!/usr/bin/env bash
# Device call 3 of 2026-12-02 (third stop), `bash benchmarks/results/s28/call3.sh`, carry [".whl"]:
# (1) the event loop's exchange (the serving default), host-timed, fused step against torch-op step,
#     alternating twice (call 2 had one run of each, whose 1k figures differed by 2x in the fused one's
#     disfavour while its hops did not);
# (2) tests/gpu (without the NIXL test, which needs the NIXL wheel), bounded by the time left.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
{
  echo "=== round trip, event loop exchange $(date -u +%T)"
  GRAPHS_TIMEOUT=45 ITERS=30 VARIANTS="armed-torch:1:1:0:0::1:ASAP_GPU_FUSED_STEP=0 armed-fused:1:1:0:0::1 \
armed-torch2:1:1:0:0::1:ASAP_GPU_FUSED_STEP=0 armed-fused2:1:1:0:0::1" \
      timeout -k 10 200 bash benchmarks/gpu_fast14.sh graphs 2>&1 | grep -E "^---|tokens:"
  left=$(( ${TESTS_BUDGET_S:-560} - SECONDS ))
  echo "=== tests/gpu with ${left} s left $(date -u +%T)"
  TESTS="tests/gpu --ignore=tests/gpu/test_nixl_gpu.py" TESTS_TIMEOUT=$left TESTS_LOG=gpu_tests OUT=$OUT \
      timeout -k 10 $((left + 15)) bash benchmarks/gpu_fast14.sh tests 2>&1 | tail -30
  echo "=== end $(date -u +%T) after $SECONDS s"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
