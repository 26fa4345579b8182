#!/usr/bin/env bash
# Device call 3 (`cd devwt && ln -sfn ../.whl .whl && bash benchmarks/results/gpu14d/call3.sh`): the
# early-results GPU test itself (both parameters, --runxfail) under the tests stage of gpu_fast14.sh (a
# private MPS daemon, CUDA_MODULE_LOADING=EAGER), every Python process dumping its stacks every 20 s.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
export ASAP_FH_DIR=$OUT/fh ASAP_FH_S=20 PYTHONPATH=$PWD/benchmarks/results/gpu14d/site
{
  TESTS="--runxfail -o faulthandler_timeout=60 tests/gpu/test_gpu_fast.py::test_hot_path_early_results_and_fills_match_grpc" \
    TESTS_TIMEOUT=128 TESTS_LOG=early_test bash benchmarks/gpu_fast14.sh tests
  for f in "$OUT"/fh/fh-*.log; do  # expert processes a cut test left behind (own session), by pid
      [ -e "$f" ] || continue
      pid=${f##*/fh-}; pid=${pid%.log}
      if kill -0 "$pid" 2>/dev/null; then echo "leftover $pid: $(head -c 120 "$f")"; kill -9 "$pid"; fi
  done
  echo "=== end $(date -u +%T)"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
