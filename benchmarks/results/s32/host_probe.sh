#!/usr/bin/env bash
# The GPU round trip's run-to-run 2x (host hops all double together): placement on SMT siblings or the
# cores' idle states? Free / one CPU per physical core / free with /dev/cpu_dma_latency held at 0, x3.
set -uo pipefail
cd "$(dirname "$0")/../../.."
lscpu | grep -E "Model name|Socket|Core|Thread|NUMA|MHz"
cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null; cat /sys/devices/system/cpu/cpu0/cpuidle/state*/name 2>/dev/null | paste -sd' '
cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null; id -u; ls -l /dev/cpu_dma_latency
PHYS=$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | cut -d, -f1 | sort -n | paste -sd,)
echo "one cpu per core: $PHYS"
source benchmarks/gpu_env.sh
export CUDA_MODULE_LOADING=EAGER
start_mps
one() {
    label=$1; shift
    "$@" python3 benchmarks/gpu_dataplane.py --planes fast --iters 10 --json "$OUT/$label.json" > "$OUT/$label.log" 2>&1
    echo "$label rc $? load $(cut -d' ' -f1 /proc/loadavg) $(grep -h 'ms median\|hops' "$OUT/$label.log" | sed 's/(exchange.*//' | tr -s ' ' | paste -sd' ')"
}
hold_latency() { python3 -c "import os,struct,time; f=os.open('/dev/cpu_dma_latency', os.O_WRONLY); os.write(f, struct.pack('i',0)); time.sleep(3600)" & holder=$!; sleep 0.5; }
for i in 1 2 3; do
    one free$i
    one pin$i taskset -c "$PHYS"
    hold_latency; one lat$i; kill $holder
done
stop_mps
