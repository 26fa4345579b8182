#!/bin/bash
cd "$(dirname "$0")"
while kill -0 1937 2>/dev/null; do sleep 10; done
./run.sh sync_r16_10s sync B 16 10
