#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels the GPU machine's image lacks into .whl/ (git-ignored
# through .git/info/exclude); the device calls carry .whl and benchmarks/gpu_env.sh installs them there.
# Versions follow constraints/ci.txt (transitive ones as resolved with them); the image has torch, protobuf, numpy, PyYAML, pytest, hypothesis.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i "^$1==" constraints/ci.txt; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  "$(pin grpcio)" "$(pin grpcio-health-checking)" "$(pin grpcio-reflection)" "$(pin pytest-asyncio)" \
  "$(pin opentelemetry-api)" "$(pin opentelemetry-sdk)" "$(pin opentelemetry-proto)" \
  "$(pin opentelemetry-exporter-otlp-proto-grpc)" "$(pin opentelemetry-exporter-otlp-proto-http)" \
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2 \
  googleapis-common-protos==1.76.0
ls .whl
