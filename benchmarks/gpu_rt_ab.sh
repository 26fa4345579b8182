#!/usr/bin/env bash
# The GPU per-layer round trip of two trees, alternating in one device call, under a private MPS daemon:
# BEFORE (a copy of the other tree inside this one, e.g. `git archive REV | tar -x -C devwt`, carried as
# devwt) and this tree, run before / after / after / before.
#
#   bash benchmarks/gpu_rt_ab.sh devwt        # PLANES=grpc,fast ITERS=30 by default; raw outputs in $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: gpu_rt_ab.sh BEFORE_DIR}
source benchmarks/gpu_env.sh
export CUDA_MODULE_LOADING=EAGER
start_mps
root=$PWD
for run in "before 1 $before" "after 1 ." "after 2 ." "before 2 $before"; do
    read -r tree n dir <<< "$run"
    echo "=== $tree $n $(date -u +%T)"
    (cd "$root/$dir" && PYTHONPATH=$PWD:/tmp/site timeout "${RUN_TIMEOUT:-130}" python3 benchmarks/gpu_dataplane.py \
        --planes "${PLANES:-grpc,fast}" --iters "${ITERS:-30}" --json "$OUT/${tree}_$n.json" > "$OUT/${tree}_$n.log" 2>&1
     echo "rc $?")
    grep -v '^ *[]}"{]' "$OUT/${tree}_$n.log" | tail -8
done
stop_mps
