#!/usr/bin/env bash
# A/B of the CPU per-layer cost, before and after a change, alternating in one script so both see the
# same host load; the load average (1 min) is printed beside every run. Usage:
#   benchmarks/ab_layer_cost.sh BEFORE_TREE AFTER_TREE ROUNDS OUT_DIR [VARIANT_ENV ...]
# Each VARIANT_ENV ("NAME=VALUE", e.g. ASAP_FAST_FUTEX=0) adds a third arm: the after tree with it set.
# Trees are plain checkouts (git archive / git worktree); PY defaults to the shared venv's python.
set -u
before=$1 after=$2 rounds=$3 out=$4
shift 4
PY=${PY:-/work/main/.venv/bin/python}
mkdir -p "$out"
arm() {  # name tree env...
  local name=$1 tree=$2
  shift 2
  for cmd in "benchmarks/layer_hops.py --experts 1 --requests 20" \
             "benchmarks/layer_hops.py --experts 4 --requests 20" \
             "benchmarks/emulated_layer_cost.py --planes fast --shapes 1x1,4x4 --warmup 5 --requests 20"; do
    tag=$(echo "$cmd" | sed 's/benchmarks\///; s/\.py//; s/ --requests 20//; s/ --warmup 5//; s/ --planes fast//; s/[ ,]/_/g')
    echo "=== $name round $r: $cmd; load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
    (cd "$tree" && env PYTHONPATH="$tree" "$@" "$PY" $cmd) > "$out/$name.$tag.r$r.txt" 2>&1
    grep -E "sum of medians|CPU per MoE|batch wall|per-layer|^\| *[14]\+[14]|fast +\|" "$out/$name.$tag.r$r.txt" | tee -a "$out/log.txt"
  done
}
for r in $(seq 1 "$rounds"); do
  if (( r % 2 )); then
    arm before "$before"; arm after "$after"; [ $# -gt 0 ] && arm variant "$after" "$@"
  else
    [ $# -gt 0 ] && arm variant "$after" "$@"; arm after "$after"; arm before "$before"
  fi
done
