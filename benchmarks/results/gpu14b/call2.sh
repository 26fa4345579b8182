#!/usr/bin/env bash
# call 2: the queue probe under MPS, then the full tests/gpu on defaults (armed steps, prefetch)
cd "$(dirname "$0")/gpu14b"
(
echo "=== queue probe under MPS $(date -u +%T)"
( source benchmarks/gpu_env.sh
d=$(mktemp -d); export CUDA_MPS_PIPE_DIRECTORY=$d/p CUDA_MPS_LOG_DIRECTORY=$d/l; mkdir -p $d/p $d/l; nvidia-cuda-mps-control -d
for c in 8 32; do for k in pool dedicated probe; do CUDA_DEVICE_MAX_CONNECTIONS=$c timeout 15 python3 benchmarks/gpu_queue_probe.py $k 40; done; done
echo quit | timeout 10 nvidia-cuda-mps-control )
echo "=== tests $(date -u +%T)"
TESTS="tests/gpu --ignore=tests/gpu/test_nixl_gpu.py" TESTS_TIMEOUT=320 TESTS_LOG=gpu_tests bash benchmarks/gpu_fast14.sh tests 2>&1 | tail -30
echo "=== end $(date -u +%T)"
) 2>&1 | tee $OUT/call2.log
