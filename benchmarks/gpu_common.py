"""What the GPU benchmark scripts share: the model configs, the trace, their progress lines, the layer
count of a model spec and a per-GPU sampler (nvidia-smi)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models"
LAYER_CONFIGS = {8: "qwen3-30b-a3b-8l", 16: "qwen3-30b-a3b-16l", 48: "qwen3-30b-a3b"}
TRACE = ROOT / "benchmarks" / "workloads" / "azure_llm_conv_2023.csv"


def say(script: str, message: str) -> None:
    """A timestamped progress line of ``script``."""
    print(f"[{script} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_layers(model: str) -> int | None:
    """Decoder layers of model spec ``model`` (None when its config cannot be read)."""
    from asap.model.config import load_config
    from asap.model.resolve import resolve_model

    try:
        return load_config(resolve_model(model)).num_layers
    except Exception:
        return None


class GpuSampler:
    """Per-GPU utilisation (%) and memory used (MiB) from nvidia-smi once a second, grouped by phase."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: dict[str, list[list[tuple[float, float]]]] = {}
        self.phase = "idle"
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def start(self) -> None:
        if self.available:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.interval_s):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
                rows = [tuple(float(v) for v in line.split(",")) for line in out.strip().splitlines()]
            except (OSError, subprocess.SubprocessError, ValueError):
                continue
            self.samples.setdefault(self.phase, []).append([(row[0], row[1]) for row in rows])

    def summary(self, phase: str) -> list[dict[str, float]] | None:
        """Per GPU: mean and p90 utilisation, max memory used, over the samples of ``phase``."""
        samples = self.samples.get(phase)
        if not samples:
            return None
        gpus = min(len(s) for s in samples)
        result = []
        for gpu in range(gpus):
            util = [s[gpu][0] for s in samples]
            result.append(
                {
                    "gpu": gpu,
                    "util_mean_pct": statistics.fmean(util),
                    "util_p90_pct": statistics.quantiles(util, n=10)[-1] if len(util) >= 10 else max(util),
                    "memory_max_mib": max(s[gpu][1] for s in samples),
                    "samples": len(util),
                }
            )
        return result
