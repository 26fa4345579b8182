#!/usr/bin/env bash
# The NIXL plane on the GPU machine (issue 20), whose image lacks nixl. Two steps:
#
# Here, where PyPI is reachable (both folders are git-ignored, so a device call carries them only when
# named in `carry`):
#   bash benchmarks/gpu_wheels.sh         # .whl/     (7.7 MiB): grpcio-health-checking, OpenTelemetry, ...
#   bash benchmarks/gpu_nixl.sh fetch     # .nixlwhl/ (~25 MiB): nixl-cu13 1.5.1, cp312 manylinux_2_28,
#                                         #   slimmed: its nixl_ep_cu13 (expert-parallel kernels, 27 MiB),
#                                         #   example/perftest programs and C++ headers left out
# nixl-cu13 needs torch and numpy only (its Requires-Dist), both on the image; everything else it links
# (UCX, its plugins) is inside the wheel. The full wheel (56 MiB) plus .whl/ would not fit the 64 MiB a
# device call carries.
#
# On the device machine (carry [".whl", ".nixlwhl"]; OUT is set by the call):
#   bash benchmarks/gpu_nixl.sh [tests|bench|all]   (default all)
#   -> $OUT/nixl_env.txt, $OUT/test_nixl_gpu.log, $OUT/nixl_dataplane_gpu.{log,json}
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"

if [ "$what" = fetch ]; then
  rm -rf .nixlwhl/full && mkdir -p .nixlwhl/full
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .nixlwhl/full nixl-cu13==1.5.1
  python3 - <<'PY'
import base64, hashlib, pathlib, zipfile
full = next(pathlib.Path(".nixlwhl/full").glob("nixl_cu13-*.whl"))
slim = pathlib.Path(".nixlwhl") / full.name
drop = ("nixl_ep_cu13/", "nixl_cu13.scripts/", "nixl_cu13-1.5.1.data/headers/", "nixl_cu13.libs/ucx/libucx_perftest")
with zipfile.ZipFile(full) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
    kept = []
    for info in src.infolist():
        if info.filename.startswith(drop) or info.filename == record_name:
            continue
        data = src.read(info)
        dst.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        kept.append(f"{info.filename},sha256={digest},{len(data)}")
    dst.writestr(record_name, "\n".join([*kept, f"{record_name},,"]) + "\n")
print(f"{slim}: {slim.stat().st_size / 2**20:.1f} MiB (from {full.stat().st_size / 2**20:.1f} MiB)")
PY
  rm -rf .nixlwhl/full
  exit 0
fi

source benchmarks/gpu_env.sh  # .whl/ into /tmp/site, PYTHONPATH, OUT
ls .nixlwhl/nixl_cu13-*.whl >/dev/null 2>&1 || { echo "no .nixlwhl/nixl_cu13-*.whl: run 'bash benchmarks/gpu_nixl.sh fetch' here and carry .nixlwhl" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .nixlwhl/nixl_cu13-*.whl
# UCX's CUDA memory hooks (libucm_cuda) need libcudart.so.13, which the wheel does not bundle: torch's
# CUDA 13 runtime wheel (nvidia/.../lib) has it, off the loader's default path
cudart="$(python3 - <<'PY'
import glob, os, site
for d in [*site.getsitepackages(), site.getusersitepackages()]:
    for p in sorted(glob.glob(os.path.join(d, "nvidia", "**", "libcudart.so.13*"), recursive=True)):
        print(os.path.dirname(p))
        raise SystemExit
PY
)"
if [ -n "$cudart" ]; then export LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
  echo "libcudart.so.13 from: ${cudart:-(not found: the CUDA memory hooks of UCX stay off)}"
  python3 -c "from asap.dataplane.nixl_link import nixl_missing; m = nixl_missing(); print('nixl:', m or 'importable'); raise SystemExit(1 if m else 0)"
  uptime
} 2>&1 | tee "$OUT/nixl_env.txt"

status=0
if [ "$what" = all ] || [ "$what" = tests ]; then
  timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -x -p no:cacheprovider -s tests/gpu/test_nixl_gpu.py \
    2>&1 | tee "$OUT/test_nixl_gpu.log" || status=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  # both ranks on cuda:0 (slots in GPU memory, UCX's CUDA transports); the bare reference in GPU memory too
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/nixl_dataplane.py --device cuda:0 --iters "${ITERS:-20}" \
    --json "$OUT/nixl_dataplane_gpu.json" 2>&1 | tee "$OUT/nixl_dataplane_gpu.log" || status=1
  uptime | tee -a "$OUT/nixl_dataplane_gpu.log"
fi
exit $status
