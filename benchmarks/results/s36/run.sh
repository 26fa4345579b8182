#!/bin/bash
# Async with three micro-batches in flight per attention rank (--max-inflight 3), async's layout at 21 rps,
# and sync-chunked at the second baseline layout (issue 16), 5-minute windows, route skew 0.3, the Azure
# conversation trace, DeepSeek-V3.2 on emulated Ascend 910 bf16, --links ports.
# usage: bash benchmarks/results/s36/run.sh [NAME ...]   (each run skipped when its JSON exists)
cd "$(dirname "$0")/../../.."
dir=benchmarks/results/s36
T=/work/shared/workloads/azure_llm_conv_2023.csv
A5="--compare async --layout disaggregated --attention 5 --attention-tp 4 --experts 12"
A4="--compare async --layout disaggregated --attention 4 --attention-tp 4 --experts 16"
declare -A runs=(
  [a5_r21]="$A5 --rate 21"
  [a5_r22_mif3]="$A5 --rate 22 --max-inflight 3"
  [a5_r24_mif3]="$A5 --rate 24 --max-inflight 3"
  [a5_r20_mif3]="$A5 --rate 20 --max-inflight 3"
  [a4_r18_mif3]="$A4 --rate 18 --max-inflight 3"
  [a4_r20_mif3]="$A4 --rate 20 --max-inflight 3"
  [a4_r22_mif3]="$A4 --rate 22 --max-inflight 3"
  [a4_r20_mif4]="$A4 --rate 20 --max-inflight 4"
  [a6tp3_e14_r20]="--compare async --layout disaggregated --attention 6 --attention-tp 3 --experts 14 --rate 20"
  [a6tp3_e14_r22]="--compare async --layout disaggregated --attention 6 --attention-tp 3 --experts 14 --rate 22"
  [chunked_c16_tp2_e32_r13]="--compare sync-chunked --layout colocated --attention 16 --attention-tp 2 --experts 32 --rate 13 --tune-chunk-tokens 2048"
)
for name in ${*:-${!runs[@]}}; do
  [ -f $dir/$name.json ] && continue
  nice -n 5 .venv/bin/asap simulate ${runs[$name]} --model benchmarks/models/deepseek-v3.2 \
    --compute emulated:ascend910 --dtype bfloat16 --trace $T --slo-ttft-ms 5000 --links ports --no-progress \
    --duration 300 --route-skew 0.3 --json $dir/$name.json > $dir/$name.log 2>&1
done
