"""The GPU benchmark scripts run on CPU with a small model: the monolithic baseline on the bench's own
prompts, and the headline driver's probe end to end (its merged JSON feeding the monolithic comparison)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asap.bench.workload import Trace, WorkloadSpec, build_requests

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT / "benchmarks" / "workloads" / "azure_llm_conv_2023.csv"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ASAP_LOG_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )


def test_monolithic_runs_the_bench_prompts_in_bounded_batches(qwen3_dir: Path, tmp_path: Path) -> None:
    done = _run(
        "gpu_monolithic.py", "--device", "cpu", "--dtype", "float32", "--model", str(qwen3_dir),
        "--requests", "12", "--warmup", "2", "--seed", "3", "--max-batch-tokens", "3000",
        "--repeats", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((tmp_path / "gpu_monolithic.json").read_text())
    spec = WorkloadSpec(arrival="trace", trace=Trace.load(TRACE), requests=12, warmup=2, seed=3)
    lengths = [r.prompt_tokens for r in build_requests(spec, None, max_prompt_tokens=4096) if not r.warmup]
    assert doc["workload"]["requests"] == 12 and doc["workload"]["prompt_tokens"] == sum(lengths)
    per_batch = [(b["prompts"], b["tokens"]) for b in doc["per_batch"]]
    assert sum(n for n, _ in per_batch) == 12 and sum(t for _, t in per_batch) == sum(lengths)
    assert all(t <= 3000 or n == 1 for n, t in per_batch), per_batch
    assert len(per_batch) > 1
    assert doc["tok_s"] == pytest.approx(sum(lengths) / min(doc["pass_seconds"]))
    assert doc["last_logits"]["finite"] and doc["last_logits"]["std"] > 0
    assert (tmp_path / "gpu_monolithic.md").read_text().startswith("# Monolithic prefill")


@pytest.mark.slow
def test_headline_probe_on_random_weights_then_the_monolithic_comparison(
    qwen3_dir: Path, tmp_path: Path
) -> None:
    arch = tmp_path / "arch"
    arch.mkdir()
    shutil.copy(qwen3_dir / "config.json", arch / "config.json")
    out = tmp_path / "out"
    probe = _run(
        "gpu_headline.py", "--probe", "--out", str(out), "--model", f"random:{arch}", "--device", "cpu",
        "--dtype", "float32", "--sweep", "20", "--requests", "10", "--", "--no-progress",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_probe.json", "gpu_probe.log", "gpu_probe.md", "gpu_probe.png",
    ]  # fmt: skip
    bench = json.loads((out / "gpu_probe.json").read_text())
    (result,) = bench["modes"]["async"]["results"]
    assert result["completed"] == 10 and result["rate_rps"] == 20
    assert bench["run"]["model"] == f"random:{arch}" and bench["run"]["layers"] == 3
    assert "suggested full run: --sweep" in probe.stdout
    mono = _run(
        "gpu_monolithic.py", "--device", "cpu", "--dtype", "float32", "--repeats", "1",
        "--bench-json", str(out / "gpu_probe.json"), "--out", str(out),
    )  # fmt: skip
    assert mono.returncode == 0, mono.stdout + mono.stderr
    doc = json.loads((out / "gpu_monolithic.json").read_text())
    assert doc["model"] == f"random:{arch}" and doc["workload"]["requests"] == 10
    async_row = doc["cluster"]["modes"]["async"]
    assert async_row["tok_s"] == result["throughput_tok_s"]
    assert async_row["scaling_efficiency"] == pytest.approx(result["throughput_tok_s"] / (2 * doc["tok_s"]))
