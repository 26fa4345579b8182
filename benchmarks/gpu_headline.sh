#!/usr/bin/env bash
# The GPU benchmarks on a machine that has only this repository (no install): installs the carried wheels
# from .whl/ (if any) into /tmp/site, keeps NVLink multicast off, and runs from the repository root.
#
#   bash benchmarks/gpu_headline.sh [ARGS]              benchmarks/gpu_headline.py ARGS (e.g. --probe --out $OUT)
#   bash benchmarks/gpu_headline.sh monolithic [ARGS]   benchmarks/gpu_monolithic.py ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    site=":/tmp/site"
fi
export PYTHONPATH="$PWD$site${PYTHONPATH:+:$PYTHONPATH}"
script=benchmarks/gpu_headline.py
if [[ "${1:-}" == "monolithic" ]]; then
    script=benchmarks/gpu_monolithic.py
    shift
fi
echo "gpu_headline.sh: python3 $script $* (PYTHONPATH=$PYTHONPATH)"
exec python3 "$script" "$@"
