#!/bin/bash
# The 8 + 4 validation with the per-layer host delay (mean and spread from emulated_layer_cost.json, 4x4 grpc)
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD
out=benchmarks/results/sim_validation_8x4_hostjitter
cmd="/work/main/.venv/bin/asap simulate --compare async,sync-chunked,sync --model benchmarks/models/qwen3-30b-a3b-8l --attention 8 --experts 4 --compute emulated:h200/50 --trace /work/shared/workloads/azure_llm_conv_2023.csv --slo-ttft-ms 3000 --sweep 8,24,40 --requests 150 --tune-chunk-tokens none --dispatch-overhead-us 10700 --host-jitter-us 4400 --no-progress --json $out.json"
{ echo "start $(date -u +%H:%M:%S) $(uptime)"; echo "$cmd"; } > $out.log
/usr/bin/time -v $cmd >> $out.log 2>&1
echo "end $(date -u +%H:%M:%S) $(uptime)" >> $out.log
