#!/usr/bin/env bash
# Device call 1 (from a copy of the tree: `cd devwt && ln -sfn ../.whl .whl && bash benchmarks/results/gpu14d/call1.sh`):
# the 1+1 cluster on one GPU held at saturation (sweep 240,240) with 960 requests per rate twice and with 480
# once between them (same command otherwise), nvidia-smi sampled every 100 ms for each, then the monolithic
# process over the same prompts (960 and 480), then the cold start (first minute after `ready:` against later).
# Everything lands in /tmp/o, packed into $OUT/res.tgz at the end.
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
sat() {  # name requests
    echo "=== $1 ($2 requests per rate) $(date -u +%T)"
    nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/$1_util.csv" &
    local smi=$!
    timeout -k 10 150 python3 benchmarks/gpu_headline.py --out "$OUT" --name "$1" --attention 1 --experts 1 \
        --modes async --sweep 240,240 --requests "$2" --slo-ttft-ms 1200 --budget-s 140 2>&1 | grep -E "^async|GPU0|\| async" | tail -6
    kill $smi
    python3 benchmarks/gpu_util_window.py "$OUT/$1_util.csv" "$OUT/$1.log"
    grep -h -o "data plane[^\"]*" "$OUT/$1.log" | sort | uniq -c | head -3
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu,clocks.sm,power.draw --format=csv
  uptime; nproc
  python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda.bindings', cuda.bindings.__version__)"
  sat sat960a 960
  sat sat480 480
  sat sat960b 960
  for n in sat960a sat480; do
    echo "=== monolithic over $n's prompts $(date -u +%T)"
    timeout -k 10 90 python3 benchmarks/gpu_monolithic.py --out "$OUT" --name "mono_$n" --bench-json "$OUT/$n.json" --repeats 2 2>&1 | tail -4
  done
  echo "=== coldstart $(date -u +%T)"
  timeout -k 10 200 bash benchmarks/gpu_headline.sh coldstart --out "$OUT" --name cs --rate 24 --duration-s 110 2>&1 | tail -25
  echo "=== end $(date -u +%T)"
} 2>&1 | tee $OUT/call.log
rm -f $OUT/*.png
tar czf $REAL/res.tgz -C /tmp o
