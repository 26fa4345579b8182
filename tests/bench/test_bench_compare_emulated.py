"""``asap bench --compare async,sync,sync-chunked`` on a small emulated cluster: structure and sanity.

Emulated compute: every rank sleeps for the modeled H200 time; a config.json alone is the model. This is
the CI-sized version of the headline run in benchmarks/headline.sh (checked for shape, not for speed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from asap.cli import main

pytestmark = pytest.mark.slow

MODES = ("async", "sync", "sync-chunked")


def test_compare_three_modes_emulated(qwen3_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(qwen3_dir / "config.json", model / "config.json")  # no weights, no tokenizer
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--compare", ",".join(MODES), "--compute", "emulated:h200", "--model", str(model),
        "--attention", "2", "--experts", "2", "--sweep", "10,20", "--requests", "24", "--warmup", "4",
        "--trace", str(Path(__file__).parents[1] / "data" / "trace_small.csv"), "--slo-ttft-ms", "1000",
        "--timeout", "30", "--seed", "3", "--json", str(out), "--no-progress",
        "--cluster-log", str(tmp_path / "cluster.log"),
    ]  # fmt: skip
    assert main(argv) == 0, (tmp_path / "cluster.log").read_text()[-3000:]
    document = json.loads(out.read_text())
    assert document["emulated"] is True and document["compute"] == "emulated:h200"
    assert set(document["modes"]) == set(MODES)
    digests = set()
    for mode in MODES:
        run = document["modes"][mode]
        assert run["error"] is None, run["error"]
        assert [r["rate_rps"] for r in run["results"]] == [10.0, 20.0]
        for result in run["results"]:
            assert result["completed"] + result["failed"] == result["requests"] == 24
            assert result["failed"] == 0, result["failures"]
            ttft = result["ttft_ms"]
            assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
            assert ttft["mean"] > 0 and 0 <= result["slo_attainment"] <= 1
            assert result["goodput_rps"] <= result["throughput_rps"] + 1e-9
            digests.add((result["rate_rps"], result["sequence"]))
        assert run["max_slo_rps"] in (None, 10.0, 20.0)
    # the identical request sequence was replayed against every mode
    assert len(digests) == 2
    assert set(document["ratios"]) == {"async/sync", "async/sync-chunked"}
