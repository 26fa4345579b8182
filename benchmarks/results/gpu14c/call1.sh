#!/usr/bin/env bash
# Device call 1 (run from a copy of the tree, `cd devwt && bash benchmarks/results/gpu14c/call1.sh`):
# the new GPU test and the default-path e2e test, the round trip A/B (fill of before vs lean fill, early
# results, device-written done flag; hot path and event-loop path), and test_gpu_streams.py alone with a
# stack dump if it hangs (as run: `timeout -s INT 70`, which did not end the hung test; TERM now). Everything lands in /tmp/o, packed into $OUT/res.tgz at the end.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
{
  TESTS="tests/gpu/test_gpu_fast.py::test_hot_path_early_results_and_fills_match_grpc tests/gpu/test_gpu_fast.py::test_fast_plane_matches_grpc_cuda_ipc_and_reference[1]" \
    TESTS_TIMEOUT=170 TESTS_LOG=t_new bash benchmarks/gpu_fast14.sh tests
  GRAPHS_TIMEOUT=45 ITERS=20 VARIANTS="old-direct:1:1:1:0:--direct:1:ASAP_GPU_LEAN_FILL=0 lean-direct:1:1:1:0:--direct:1 early-direct:1:1:1:0:--direct:1:ASAP_GPU_HOST_FREE=1 early-done-direct:1:1:1:0:--direct:1:ASAP_GPU_HOST_FREE=1,ASAP_GPU_DEVICE_DONE=1 lean-done-direct:1:1:1:0:--direct:1:ASAP_GPU_DEVICE_DONE=1 old-loop:1:1:0:0::1:ASAP_GPU_LEAN_FILL=0 lean-loop:1:1:0:0::1 old-direct-timed:1:1:1:1:--direct:1:ASAP_GPU_LEAN_FILL=0 lean-direct-timed:1:1:1:1:--direct:1 old-direct2:1:1:1:0:--direct:1:ASAP_GPU_LEAN_FILL=0 lean-direct2:1:1:1:0:--direct:1 early-done-direct2:1:1:1:0:--direct:1:ASAP_GPU_HOST_FREE=1,ASAP_GPU_DEVICE_DONE=1" \
    bash benchmarks/gpu_fast14.sh graphs
  echo "=== test_gpu_streams alone $(date -u +%T)"
  source benchmarks/gpu_env.sh
  CUDA_MODULE_LOADING=EAGER timeout 70 python3 -X faulthandler -m pytest -q -x -p no:cacheprovider -s \
    -o faulthandler_timeout=55 tests/gpu/test_gpu_streams.py 2>&1 | tee $OUT/streams_alone.log | tail -60
  echo "=== end $(date -u +%T)"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
