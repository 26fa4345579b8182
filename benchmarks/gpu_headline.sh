#!/usr/bin/env bash
# The GPU headline benchmarks on the device machine (only this repository there, nothing installed):
# benchmarks/gpu_env.sh installs the carried wheels from .whl/ into /tmp/site, sets PYTHONPATH to the
# checkout and /tmp/site and keeps NVLink multicast off; then, from the repository root:
#
#   bash benchmarks/gpu_headline.sh [ARGS]              python3 benchmarks/gpu_headline.py ARGS
#   bash benchmarks/gpu_headline.sh monolithic [ARGS]   python3 benchmarks/gpu_monolithic.py ARGS
#   bash benchmarks/gpu_headline.sh coldstart [ARGS]    python3 benchmarks/gpu_coldstart.py ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
script=benchmarks/gpu_headline.py
if [[ "${1:-}" == "monolithic" ]]; then
    script=benchmarks/gpu_monolithic.py
    shift
elif [[ "${1:-}" == "coldstart" ]]; then
    script=benchmarks/gpu_coldstart.py
    shift
fi
echo "gpu_headline.sh: python3 $script $* (PYTHONPATH=$PYTHONPATH)"
exec python3 "$script" "$@"
