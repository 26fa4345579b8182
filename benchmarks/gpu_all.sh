#!/usr/bin/env bash
# Everything recorded under "GPU runs" in benchmarks/README.md, in one device call (nvidia-h200-x2, carry .whl):
#   bash benchmarks/gpu_all.sh      (results under $OUT; logs and per-mode files packed into $OUT/all.tgz)
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
LAYERS=${LAYERS:-16}
SWEEP=${SWEEP:-4,8,16,24,32,48}
REQUESTS=${REQUESTS:-80}
echo "== headline: async vs sync-chunked vs sync, $LAYERS layers, 2 attention + 2 expert ranks on 2 GPUs"
bash benchmarks/gpu_headline.sh --out "$OUT" --layers "$LAYERS" --sweep "$SWEEP" --requests "$REQUESTS" \
  --slo-ttft-ms "${SLO_MS:-2000}" --budget-s "${BUDGET_S:-360}" 2>&1 | tail -45
echo "== monolithic: the same model and prompts on one GPU"
timeout 150 bash benchmarks/gpu_headline.sh monolithic --out "$OUT" --bench-json "$OUT/gpu_headline.json" 2>&1 | tail -25
echo "== GPU tests"
timeout 90 python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tail -4
echo "== expert routine"
timeout 60 python3 benchmarks/gpu_experts.py --json "$OUT/gpu_experts.json" > "$OUT/gpu_experts.log" 2>&1
tail -25 "$OUT/gpu_experts.log"
cd "$OUT" && tar czf all.tgz --remove-files $(ls | grep -v -E '^(gpu_headline\.(json|md|png)|gpu_monolithic\.json|gpu_experts\.json)$')
ls -la "$OUT"
