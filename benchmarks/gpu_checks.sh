#!/usr/bin/env bash
# GPU checks on the device machine (2 GPUs): environment, the GPU tests, the data-plane microbenchmark,
# and a short end-to-end smoke of the three modes on a random-weights Qwen3-MoE shape.
#   bash benchmarks/gpu_checks.sh            (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=index,name,uuid,memory.total --format=csv
nvidia-smi topo -m || true
python3 -c 'import torch, grpc, google.protobuf as pb; print("torch", torch.__version__, "gpus", torch.cuda.device_count(), "grpc", grpc.__version__, "protobuf", pb.__version__)'
echo "== GPU tests"
timeout 170 python3 -m pytest tests/gpu tests/model/test_grouped.py tests/dataplane -q -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log"
echo "== data plane microbenchmark"
timeout 140 python3 benchmarks/gpu_dataplane.py --json "$OUT/gpu_dataplane.json" 2>&1 | grep -v '^ \|^[{}]' | tee "$OUT/gpu_dataplane.log"
if [ "${SMOKE:-1}" = 1 ]; then
  echo "== end-to-end smoke: 2 attention + 2 expert ranks on the GPUs, three modes"
  timeout 240 python3 -m asap bench --compare async,sync-chunked,sync --model random:benchmarks/models/qwen3-30b-a3b-8l \
    --device cuda --dtype bfloat16 --attention 2 --experts 2 --trace benchmarks/workloads/azure_llm_conv_2023.csv \
    --rate 4 --requests 40 --no-progress --json "$OUT/gpu_smoke.json" --cluster-log "$OUT/gpu_smoke_cluster.log" 2>&1 | tail -40
fi
