#!/usr/bin/env bash
# call 1: the queue probe, the hang on the restored tree, the fixed tree's test, the round trip
cd "$(dirname "$0")/gpu14b"
(
timeout 60 bash -c 'source benchmarks/gpu_env.sh; for c in 8 32; do for k in pool dedicated probe; do CUDA_DEVICE_MAX_CONNECTIONS=$c timeout 25 python3 benchmarks/gpu_queue_probe.py $k 40; done; done' 2>&1 | tee $OUT/queue_probe.log
echo "=== repro on the restored tree (cf14716 GPU files) $(date -u +%T)"
(cd ../gpu14old && TESTS=tests/gpu/test_cuda_dataplane.py TESTS_TIMEOUT=130 TESTS_LOG=repro_old bash benchmarks/gpu_fast14.sh tests 2>&1 | tail -15)
echo "=== fixed tree, armed on $(date -u +%T)"
ASAP_GPU_ARMED_STEPS=1 TESTS=tests/gpu/test_cuda_dataplane.py TESTS_TIMEOUT=150 TESTS_LOG=new_cuda_dataplane bash benchmarks/gpu_fast14.sh tests 2>&1 | tail -8
echo "=== graphs $(date -u +%T)"
VARIANTS="main:1:0:0:0::0 prefetch:1:0:0:0::1 armed:1:1:0:0::1 armed-direct:1:1:1:0:--direct:1" ITERS=20 GRAPHS_TIMEOUT=90 timeout 330 bash benchmarks/gpu_fast14.sh graphs
echo "=== end $(date -u +%T)"
) 2>&1 | tee $OUT/call1.log
cd $OUT && tar czf /tmp/call1.tgz --exclude=call1.log . && find . -mindepth 1 -not -name call1.log -delete; mv /tmp/call1.tgz $OUT/
