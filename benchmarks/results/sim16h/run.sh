#!/bin/bash
# usage: [MODEL=deepseek-v3.2-dense] [OUT_DIR=DIR] run.sh NAME MODE LAYOUT RATE DURATION [extra flags...]
# (round 4 of the paper table; OUT_DIR, default this directory, for later rounds)
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD
name=$1 mode=$2 layout=$3 rate=$4 dur=$5; shift 5
M="--model benchmarks/models/${MODEL:-deepseek-v3.2} --compute emulated:ascend910 --dtype bfloat16"
W="--trace /work/shared/workloads/azure_llm_conv_2023.csv --slo-ttft-ms 5000 --links ports --no-progress"
if [ "$layout" = A ]; then L="--layout disaggregated --attention 4 --attention-tp 4 --experts 16"
else L="--layout colocated --attention 8 --attention-tp 4 --experts 32"; fi
out=${OUT_DIR:-benchmarks/results/sim16h}/$name
{ echo "start $(date -u +%H:%M:%S) $(uptime)"; echo "asap simulate --compare $mode $M $L $W --rate $rate --duration $dur $* --json $out.json"; } > $out.log
nice -n 10 /usr/bin/time -v /work/main/.venv/bin/asap simulate --compare $mode $M $L $W --rate $rate --duration $dur "$@" --json $out.json >> $out.log 2>&1
echo "end $(date -u +%H:%M:%S) $(uptime)" >> $out.log
