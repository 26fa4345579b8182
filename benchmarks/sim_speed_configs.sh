#!/bin/bash
# The simulator-speed A/B of rounds 4 and 5 on every configuration they quote, one script, back to back:
# `sim_speed_ab.sh BEFORE AFTER OUT/NAME FLAGS` per configuration, then `sim_json_same.py` on its pair.
#   benchmarks/sim_speed_configs.sh BEFORE_TREE AFTER_TREE OUT_DIR [NAME...]
# NAMEs (default all): smoke w10 val col issue_cal issue_w10. The issue pairs are the 32 + 16 configuration
# (start-up alone, and the 10 s window); serving per simulated second = (window - start-up) CPU / 13.9 s.
set -u
before=$1 after=$2 out=$3
shift 3
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(smoke w10 val col issue_cal issue_w10)
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
T=${TRACE:-/work/shared/workloads/azure_llm_conv_2023.csv}
small=(--model benchmarks/models/qwen3-30b-a3b-8l --compute emulated:h200/50 --trace "$T" --slo-ttft-ms 3000
  --tune-chunk-tokens none --requests 40)
paper=(--compare async --model benchmarks/models/deepseek-v3.2 --layout disaggregated
  --compute emulated:ascend910 --dtype bfloat16 --trace "$T" --slo-ttft-ms 5000 --rate 10)
for name in "${names[@]}"; do
  case $name in
    smoke) flags=() ;;
    w10) flags=("${paper[@]}" --attention 4 --attention-tp 4 --experts 16 --duration 10 --warmup 5) ;;
    val) flags=(--compare async,sync-chunked,sync "${small[@]}" --attention 8 --experts 4 --sweep 8,24
      --dispatch-overhead-us 10700 --barrier-overhead-us 12800) ;;
    col) flags=(--compare sync-chunked,sync,async "${small[@]}" --layout colocated --attention 4
      --attention-tp 2 --experts 8 --sweep 16) ;;
    issue_cal) flags=("${paper[@]}" --attention 32 --experts 16 --requests 1 --warmup 0) ;;
    issue_w10) flags=("${paper[@]}" --attention 32 --experts 16 --duration 10 --warmup 5) ;;
    *) echo "unknown configuration $name" >&2; exit 2 ;;
  esac
  echo "#### $name $(date -u +%T)"
  nice -n 10 "$here/sim_speed_ab.sh" "$before" "$after" "$out/$name" "${flags[@]}"
  "$PY" "$here/sim_json_same.py" "$out/$name/before.json" "$out/$name/after.json"
done
