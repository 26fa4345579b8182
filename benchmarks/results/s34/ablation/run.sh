#!/bin/bash
# The ablation of results/s33 refined (issue 16): the two variants that matched "all four" at 17 rps run at
# 17.5 and 18 beside "all four" at 17.5, and the two that failed at 14 run lower (13, then 12 if 13 fails).
# Same setting as s33: async, layout A, 5-minute windows, route skew 0.3.
# usage: bash benchmarks/results/s34/ablation/run.sh
cd "$(dirname "$0")/../../../.."
dir=benchmarks/results/s34/ablation
all=$(/work/main/.venv/bin/python -c "from asap.optimizations import OPTIMIZATIONS; print(*OPTIMIZATIONS)")
keeps_up() { python3 -c "
import json, sys; r = json.load(open(sys.argv[1]))['modes']['async']['results'][0]
sys.exit(0 if r['throughput_rps'] / r['rate_rps'] >= 0.9 and r['slo_attainment'] >= 0.9 else 1)" "$1"; }
one() {  # VARIANT RATE: one 5-minute run (skipped when its JSON exists)
    local variant=$1 rate=$2 opts
    if [ "$variant" = all ]; then opts=all; elif [ "$variant" = none ]; then opts=none
    else opts=$(echo $all | tr ' ' '\n' | grep -vx "${variant#no-}" | paste -sd,); fi
    name=dsa_async_r${rate}_300s_skew03_$variant
    [ -f $dir/$name.json ] || OUT_DIR=$dir bash benchmarks/results/sim16h/run.sh $name async A $rate 300 \
        --route-skew 0.3 --optimizations $opts
}
for variant in no-layer-agnostic no-min-batch; do one $variant 18; done
for variant in all no-layer-agnostic no-min-batch; do one $variant 17.5; done
for variant in no-dual-batch none; do
    one $variant 13
    keeps_up $dir/dsa_async_r13_300s_skew03_$variant.json || one $variant 12
done
