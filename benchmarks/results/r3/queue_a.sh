#!/bin/bash
cd "$(dirname "$0")"
while kill -0 32548 2>/dev/null; do sleep 10; done
./validation.sh
./run.sh async_r24_10s async A 24 10
for opts in none dual-batch,expert-overlap,layer-agnostic min-batch,expert-overlap,layer-agnostic min-batch,dual-batch,layer-agnostic min-batch,dual-batch,expert-overlap; do
  ./run.sh ablation_r24_10s_${opts//,/+} async A 24 10 --optimizations $opts
done
./run.sh sync_r4_5s_breakdown sync B 4 5
