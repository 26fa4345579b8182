#!/usr/bin/env bash
# Device call 2 (`cd devwt && ln -sfn ../.whl .whl && bash benchmarks/results/gpu14d/call2.sh`):
# (1) the 1+1 cluster at saturation (sweep 240,240, 480 requests per rate) on this tree and on the tree of
#     the earlier wave that measured 1.02x (bd56560, exported to old/ beside this tree), back to back;
# (2) the early-results hang: benchmarks/gpu_early_probe.py sequences under a private MPS daemon (as the
#     tests stage), every Python process dumping its stacks every 20 s (results/gpu14d/site/sitecustomize.py).
REAL=$OUT
export OUT=/tmp/o
mkdir -p $OUT
cd "$(dirname "$0")/../../.."
source benchmarks/gpu_env.sh
NEW=$PWD
sat() {  # name tree
    echo "=== $1 ($2) $(date -u +%T)"
    nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/$1_util.csv" &
    local smi=$!
    (cd "$2" && PYTHONPATH="$2:/tmp/site" timeout -k 10 70 python3 benchmarks/gpu_headline.py --out "$OUT" --name "$1" \
        --attention 1 --experts 1 --modes async --sweep 240,240 --requests 480 --slo-ttft-ms 1200 --budget-s 65 2>&1 \
        | grep -E "^async " | tail -2)
    kill $smi
    python3 "$NEW/benchmarks/gpu_util_window.py" "$OUT/$1_util.csv" "$OUT/$1.log"
    grep -h -o "data plane[^\"]*" "$OUT/$1.log" | sort | uniq -c | head -2
}
probe() {  # timeout, clusters...
    local t=$1; shift
    if (( SECONDS + t > 262 )); then echo "=== probe $* skipped (at $SECONDS s of the call)"; return; fi
    echo "=== probe $* ($(date -u +%T))"
    PYTHONPATH="$NEW/benchmarks/results/gpu14d/site:$PYTHONPATH" timeout -k 5 "$t" python3 benchmarks/gpu_early_probe.py "$@" \
        --ready-s 25 --stacks "$OUT/fh" 2>&1 | grep -v "^ *$" | tail -12
    echo "rc ${PIPESTATUS[0]}"
    for f in "$OUT"/fh/fh-*.log; do  # expert processes a killed probe left behind (own session), by pid
        [ -e "$f" ] || continue
        pid=${f##*/fh-}; pid=${pid%.log}
        if kill -0 "$pid" 2>/dev/null; then echo "killing leftover $pid: $(head -c 120 "$f")"; kill -9 "$pid"; fi
    done
}
{
  env | grep -E "^(CUDA|NCCL|TORCH|PYTORCH|OMP)" | sort
  uptime
  sat new1 "$NEW"
  sat old "$NEW/old"
  mps_dir=$(mktemp -d /tmp/asap-mps.XXXX)
  export CUDA_MPS_PIPE_DIRECTORY=$mps_dir/pipe CUDA_MPS_LOG_DIRECTORY=$mps_dir/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && echo "MPS daemon started"
  export CUDA_MODULE_LOADING=EAGER ASAP_FH_DIR=$OUT/fh ASAP_FH_S=20
  probe 70 grpc lean early done oldfill
  probe 45 early done
  probe 45 lean grpc
  echo quit | timeout 20 nvidia-cuda-mps-control || echo "MPS quit did not return"
  cp -r "$mps_dir/log" "$OUT/mps_log" 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  probe 50 grpc lean early
  echo "=== end $(date -u +%T)"
} 2>&1 | tee $OUT/call.log
tar czf $REAL/res.tgz -C /tmp o
