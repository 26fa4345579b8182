#!/bin/bash
# Ablation at the paper's scale with 5-minute windows (issue 16): async, layout A, skew 0.3; each variant
# from 17 rps down until it keeps up (completed / offered >= 0.9 and >= 90% within the SLO).
# "all four" at 17 is results/s32/w300/dsa_async_r17_300s_skew03.json.
# usage: bash benchmarks/results/s33/ablation/run.sh [VARIANT ...]
cd "$(dirname "$0")/../../../.."
dir=benchmarks/results/s33/ablation
all=$(/work/main/.venv/bin/python -c "from asap.optimizations import OPTIMIZATIONS; print(*OPTIMIZATIONS)")
keeps_up() { python3 -c "
import json, sys; r = json.load(open(sys.argv[1]))['modes']['async']['results'][0]
sys.exit(0 if r['throughput_rps'] / r['rate_rps'] >= 0.9 and r['slo_attainment'] >= 0.9 else 1)" "$1"; }
for variant in ${*:-none no-dual-batch no-expert-overlap no-min-batch no-layer-agnostic}; do
    if [ "$variant" = none ]; then opts=none; else
        opts=$(echo $all | tr ' ' '\n' | grep -vx "${variant#no-}" | paste -sd,); fi
    for rate in 17 16 15 14; do
        name=dsa_async_r${rate}_300s_skew03_$variant
        [ -f $dir/$name.json ] || OUT_DIR=$dir bash benchmarks/results/sim16h/run.sh $name async A $rate 300 \
            --route-skew 0.3 --optimizations $opts
        keeps_up $dir/$name.json && break
    done
done
