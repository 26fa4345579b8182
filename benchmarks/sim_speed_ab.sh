#!/bin/bash
# Simulator speed A/B: the same `asap simulate` command on two trees, back to back, CPU seconds (user +
# sys of the process, /usr/bin/time) and the load average beside each; TTFTs and sequence digests printed
# so the two can be checked identical.
#   benchmarks/sim_speed_ab.sh BEFORE_TREE AFTER_TREE OUT_DIR [simulate flags...]
# With no flags: the paper-scale async smoke command below (DS-V3.2 shape, 4 x TP4 + 16 expert ranks).
set -euo pipefail
before=$1 after=$2 out=$3
shift 3
PY=${PY:-/work/main/.venv/bin/python}
TRACE=${TRACE:-/work/shared/workloads/azure_llm_conv_2023.csv}
mkdir -p "$out"
flags=("$@")
if [ ${#flags[@]} -eq 0 ]; then
  flags=(--compare async --model benchmarks/models/deepseek-v3.2 --attention 4 --attention-tp 4
    --experts 16 --layout disaggregated --compute emulated:ascend910 --dtype bfloat16 --trace "$TRACE"
    --slo-ttft-ms 5000 --rate 10 --requests 8 --warmup 1)
fi
cmd=(-m asap simulate "${flags[@]}" --no-progress)
for side in before after; do
  tree=$before
  [ "$side" = after ] && tree=$after
  echo "== $side ($tree) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd "$tree" && PYTHONPATH=$PWD /usr/bin/time -f "$side cpu_user_s %U cpu_sys_s %S wall_s %e" \
    "$PY" "${cmd[@]}" --json "$out/$side.json" 2>&1 | grep -E "events|cpu_user|^(async|sync|sync-chunked) ")
  echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)"
done
"$PY" - "$out" <<'PY'
import json, sys
docs = {side: json.load(open(f"{sys.argv[1]}/{side}.json")) for side in ("before", "after")}
for side, doc in docs.items():
    for mode, sweep in doc["modes"].items():
        run = doc["simulation"]["runs"][mode]
        rows = [(r["rate_rps"], r.get("sequence"), r["ttft_ms"]) for r in sweep["results"]]
        print(side, mode, "events", run["events"], "cpu_s", run["cpu_s"], rows)
same = all(
    [(r.get("sequence"), r["ttft_ms"]) for r in docs["before"]["modes"][m]["results"]]
    == [(r.get("sequence"), r["ttft_ms"]) for r in docs["after"]["modes"][m]["results"]]
    for m in docs["before"]["modes"]
)
print("identical TTFTs and sequence digests:", same)
PY
