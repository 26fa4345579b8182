#!/bin/bash
cd "$(dirname "$0")"
while kill -0 32550 2>/dev/null; do sleep 10; done
./run.sh syncchunked2k_r15_20s sync-chunked B 15 20 --tune-chunk-tokens 2048
./run.sh syncchunked16k_r15_20s sync-chunked B 15 20 --tune-chunk-tokens 16384
