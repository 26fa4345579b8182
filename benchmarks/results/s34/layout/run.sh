#!/bin/bash
# Async's batch bound and layout at 32 devices, and one layout of the sync baseline (issue 16), 5-minute
# windows, route skew 0.3, the Azure conversation trace, DeepSeek-V3.2 on emulated Ascend 910 bf16.
# usage: bash benchmarks/results/s34/layout/run.sh [NAME ...]   (each run skipped when its JSON exists)
cd "$(dirname "$0")/../../../.."
dir=benchmarks/results/s34/layout
T=/work/shared/workloads/azure_llm_conv_2023.csv
declare -A runs=(
  [A_r18_mbt16384]="--compare async --layout disaggregated --attention 4 --attention-tp 4 --experts 16 --rate 18 --max-batch-tokens 16384"
  [A_r18_mbt4096]="--compare async --layout disaggregated --attention 4 --attention-tp 4 --experts 16 --rate 18 --max-batch-tokens 4096"
  [a5_tp4_e12_r18]="--compare async --layout disaggregated --attention 5 --attention-tp 4 --experts 12 --rate 18"
  [a5_tp4_e12_r20]="--compare async --layout disaggregated --attention 5 --attention-tp 4 --experts 12 --rate 20"
  [a5_tp4_e12_r22]="--compare async --layout disaggregated --attention 5 --attention-tp 4 --experts 12 --rate 22"
  [a6_tp4_e8_r20]="--compare async --layout disaggregated --attention 6 --attention-tp 4 --experts 8 --rate 20"
  [sync_c16_tp2_e32_r13]="--compare sync --layout colocated --attention 16 --attention-tp 2 --experts 32 --rate 13"
)
for name in ${*:-${!runs[@]}}; do
  [ -f $dir/$name.json ] && continue
  nice -n 5 .venv/bin/asap simulate ${runs[$name]} --model benchmarks/models/deepseek-v3.2 \
    --compute emulated:ascend910 --dtype bfloat16 --trace $T --slo-ttft-ms 5000 --links ports --no-progress \
    --duration 300 --route-skew 0.3 --json $dir/$name.json > $dir/$name.log 2>&1
done
