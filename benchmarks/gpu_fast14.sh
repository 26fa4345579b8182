#!/usr/bin/env bash
# The GPU fast plane on one H200 (issue 14): GPU tests, the per-layer round trip of the three planes, and
# the 1+1 cluster on one GPU against the monolithic process. Stages as arguments (default: all):
#
#   bash benchmarks/gpu_fast14.sh tests dataplane      # tests/gpu + benchmarks/gpu_dataplane.py
#   bash benchmarks/gpu_fast14.sh headline              # gpu_headline.py 1+1 (auto = fast) + gpu_monolithic.py
#   TESTS=tests/gpu/test_gpu_graph.py bash benchmarks/gpu_fast14.sh tests graphs
#                                   # the fast plane's round trip: eager, captured, armed steps (see graphs)
#   VARIANTS="armed:1:1:0:0: armed-direct:1:1:1:0:--direct" bash benchmarks/gpu_fast14.sh graphs
#                                   # chosen variants, name:STEP_GRAPHS:ARMED_STEPS:HOT_PATH:DEVICE_TIMING:flag[:PREFETCH[:VAR=V,VAR=V]]
#                                   # (DATAPLANE_ARGS="--host-ahead-us 2000": more gpu_dataplane.py flags for every variant)
#   REQUESTS=480 bash benchmarks/gpu_fast14.sh ratio   # 1+1 at saturation, then monolithic at 16384 and 8192
#                                   # tokens per batch over the same prompts (~110 s; not yet run)
# The full tests/gpu needs about 350 s (TESTS_TIMEOUT, default 420): run it before long benchmark stages.
#
# The tests and the round trip run under a private MPS daemon started here (the cluster of the headline
# starts its own through asap.mps). Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
stages="${*:-tests dataplane headline}"
nvidia-smi --query-gpu=name,driver_version,memory.used,utilization.gpu --format=csv
python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda.bindings', cuda.bindings.__version__)"
export CUDA_MODULE_LOADING=EAGER
for stage in $stages; do
    echo "=== $stage $(date -u +%T)"
    case $stage in
    tests)
        start_mps
        timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/gpu/test_gpu_fast.py tests/gpu/test_cuda_dataplane.py} \
            -s 2>&1 | tee "$OUT/${TESTS_LOG:-gpu_tests}.log" | tail -40
        stop_mps ;;
    dataplane)
        start_mps
        timeout 240 python3 benchmarks/gpu_dataplane.py --json "$OUT/gpu_dataplane_fast.json" 2>&1 | tee "$OUT/gpu_dataplane.log" | grep -v '^ *[]}"{]' | tail -30
        ps -eo pid,comm | grep -i mps
        stop_mps ;;
    graphs)  # the fast plane's round trip: eager expert steps, captured ones launched when the descriptor
             # arrives, captured ones armed before it (expert_svc.gpu_link_end), armed through the attention
             # rank's hot path (ASAP_GPU_HOT_PATH=1, --direct), and armed with device timing events
        start_mps
        for variant in ${VARIANTS:-eager:0:0:0:0: graphs:1:0:0:0: armed:1:1:0:0: armed-direct:1:1:1:0:--direct armed-timed:1:1:0:1: graphs-timed:1:0:0:1:}; do
            IFS=: read -r name graphs armed hot timed flag prefetch extra <<< "$variant"
            prefetch=${prefetch:-1}
            extra=${extra//,/ }  # more VAR=VALUE settings, comma-separated (e.g. ASAP_GPU_HOST_FREE=1,ASAP_GPU_DEVICE_DONE=1)
            echo "--- $name (ASAP_GPU_STEP_GRAPHS=$graphs ASAP_GPU_ARMED_STEPS=$armed ASAP_GPU_HOT_PATH=$hot ASAP_GPU_DEVICE_TIMING=$timed ASAP_GPU_PREFETCH=$prefetch $extra $flag)"
            env ASAP_GPU_STEP_GRAPHS=$graphs ASAP_GPU_ARMED_STEPS=$armed ASAP_GPU_HOT_PATH=$hot ASAP_GPU_DEVICE_TIMING=$timed \
                ASAP_GPU_PREFETCH=$prefetch $extra \
                timeout "${GRAPHS_TIMEOUT:-120}" \
                python3 benchmarks/gpu_dataplane.py --planes fast $flag ${DATAPLANE_ARGS:-} --iters "${ITERS:-30}" \
                --json "$OUT/gpu_dataplane_$name.json" > "$OUT/gpu_dataplane_$name.log" 2>&1
            grep -v '^ *[]}"{]' "$OUT/gpu_dataplane_$name.log" | tail -6
        done
        stop_mps ;;
    dataplane-nospin)  # the fast plane with poll threads that park at once
        start_mps
        ASAP_GPU_POLL_SPIN_S=0 timeout 120 python3 benchmarks/gpu_dataplane.py --planes grpc,fast --iters 20 \
            --json "$OUT/gpu_dataplane_fast_nospin.json" 2>&1 | grep -v '^ *[]}"{]' | tail -12
        stop_mps ;;
    saturation)  # the 1+1 cluster held at saturation, GPU utilisation sampled every 100 ms meanwhile
        nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/h11_util.csv" &
        smi=$!
        timeout 300 python3 benchmarks/gpu_headline.py --out "$OUT" --name h11_sat --attention 1 --experts 1 \
            --modes async --sweep 240,240 --requests 960 --slo-ttft-ms 1200 --budget-s 290 2>&1 | grep -E "^async|GPU0" | tail -6
        kill $smi
        python3 benchmarks/gpu_util_window.py "$OUT/h11_util.csv" "$OUT/h11_sat.log" ;;
    ratio)  # a same-call pair: the 1+1 cluster at saturation (REQUESTS per rate, default 480), then the
            # monolithic process over its prompts with its own batches (16384 tokens) and with the
            # scheduler's (8192 tokens, the batch-matched ratio)
        nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/h11_ratio_util.csv" &
        smi=$!
        timeout -k 10 150 python3 benchmarks/gpu_headline.py --out "$OUT" --name h11_ratio --attention 1 --experts 1 \
            --modes async --sweep 240,240 --requests "${REQUESTS:-480}" --slo-ttft-ms 1200 --budget-s 140 2>&1 | grep -E "^async " | tail -2
        kill $smi
        python3 benchmarks/gpu_util_window.py "$OUT/h11_ratio_util.csv" "$OUT/h11_ratio.log"
        for tokens in 16384 8192; do
            timeout -k 10 90 python3 benchmarks/gpu_monolithic.py --out "$OUT" --name "mono_$tokens" --bench-json "$OUT/h11_ratio.json" \
                --max-batch-tokens $tokens --repeats 2 2>&1 | grep -E "pass [0-9]" | tail -2
        done ;;
    headline-ipc)  # the same cluster on CUDA IPC over gRPC: cuda.bindings hidden, so auto cannot pick fast
        mkdir -p /tmp/nocuda/cuda && echo 'raise ImportError("hidden for the comparison")' > /tmp/nocuda/cuda/__init__.py
        PYTHONPATH=/tmp/nocuda:$PYTHONPATH timeout 200 python3 benchmarks/gpu_headline.py --out "$OUT" --name h11_ipc \
            --attention 1 --experts 1 --modes async --sweep "${SWEEP:-96,160,240}" --requests "${REQUESTS:-240}" \
            --slo-ttft-ms 1200 --budget-s 190 2>&1 | grep -E "^async|GPU0|data plane" | tail -8
        grep -h -o "data plane[^\"]*" "$OUT/h11_ipc.log" | sort | uniq -c | head -5 ;;
    headline)
        timeout 330 python3 benchmarks/gpu_headline.py --out "$OUT" --name h11_fast --attention 1 --experts 1 \
            --modes async --sweep "${SWEEP:-96,160,240}" --requests "${REQUESTS:-240}" --slo-ttft-ms 1200 --budget-s 300 2>&1 | tail -12
        grep -h -o "data plane[^\"]*" "$OUT/h11_fast.log" | sort | uniq -c | head -5
        timeout 200 python3 benchmarks/gpu_monolithic.py --out "$OUT" --bench-json "$OUT/h11_fast.json" --repeats 2 2>&1 | tail -15 ;;
    esac
done
