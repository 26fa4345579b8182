#!/bin/bash
cd "$(dirname "$0")"
while kill -0 1935 2>/dev/null; do sleep 10; done
./run.sh async_r20_20s async A 20 20
