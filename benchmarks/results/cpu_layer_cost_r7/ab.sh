#!/usr/bin/env bash
# A/B alternating: before (main af51f43), after (branch), variant (branch, ASAP_EMULATED_TAIL_SPIN_US=0)
set -u
out=${1:-/tmp/cpu14g/ab1}; rounds=${2:-3}
PY=/work/main/.venv/bin/python
mkdir -p "$out"
run() {  # name tree cmd env...
  local name=$1 tree=$2 cmd=$3; shift 3
  echo "=== $name r$r: $cmd; load $(cut -d' ' -f1-3 /proc/loadavg) $(date -u +%T)" | tee -a "$out/log.txt"
  (cd "$tree" && env PYTHONPATH="$tree" "$@" $PY $cmd) > "$out/$name.$(echo $cmd | cut -c12-20).r$r.txt" 2>&1
  grep -E "per-layer|published -> picked|compute end|taken -> resumed|resumed -> next|  compute |sum of medians|CPU per MoE|spin:|batch wall" "$out/$name.$(echo $cmd | cut -c12-20).r$r.txt" | tee -a "$out/log.txt"
}
C1="benchmarks/emulated_layer_cost.py --planes fast --shapes 1x1 --warmup 5 --requests 20"
for r in $(seq 1 $rounds); do
  if (( r % 2 )); then
    run before /tmp/cpu14g/before "$C1"; run after /tmp/cpu14g/after "$C1"; run variant /tmp/cpu14g/after "$C1" ASAP_EMULATED_TAIL_SPIN_US=0
  else
    run variant /tmp/cpu14g/after "$C1" ASAP_EMULATED_TAIL_SPIN_US=0; run after /tmp/cpu14g/after "$C1"; run before /tmp/cpu14g/before "$C1"
  fi
done
