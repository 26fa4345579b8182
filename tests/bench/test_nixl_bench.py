"""The NIXL benchmark's bookkeeping (``benchmarks/nixl_dataplane.py``, ``benchmarks/nixl_paths.py``): the
UCX protocol tables it reads back, the per-pair shares against the bare UCX reference, and one tiny run
end to end where NIXL is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asap.dataplane.nixl_link import nixl_missing
from benchmarks.nixl_dataplane import ucx_protocols
from benchmarks.nixl_paths import Shape, figures

ROOT = Path(__file__).resolve().parents[2]

_TABLES = """\
[1.1] [vm:1:0]   | ping self cfg#0                                          |
[1.1] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1.1] [vm:1:0]   +--------+-------------+-----------------------------------+
[1.1] [vm:1:0]   | 0..inf | zero-copy   | self/memory                       |
[1.1] [vm:1:0]   +--------+-------------+-----------------------------------+
[1.2] [vm:1:0]   +--------+-------------+-----------------------------------+
[1.2] [vm:1:0]   | ping intra-node cfg#1                                    |
[1.2] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1.2] [vm:1:0]   +--------+-------------+-----------------------------------+
[1.2] [vm:1:0]   | Range  | Description |              Config               |
[1.2] [vm:1:0]   +--------+-------------+-----------------------------------+
[1.2] [vm:1:0]   | 0..inf | zero-copy   | cma/memory                        |
[1.2] [vm:1:0]   +--------+-------------+-----------------------------------+
[1.3] [vm:1:0]   | asap-a0-e0-12-ab intra-node cfg#1                        |
[1.3] [vm:1:0]   | active message by ucp_am_send* from host memory |
[1.3] [vm:1:0]   +------------+--------------------+---------------+
[1.3] [vm:1:0]   |          0 | short              | tcp/lo        |
[1.3] [vm:1:0]   | 16516..inf | multi-frag copy-in | tcp/lo        |
[1.3] [vm:1:0]   +------------+--------------------+---------------+
"""


def test_protocol_tables_name_the_transports_between_processes() -> None:
    assert ucx_protocols(_TABLES) == {
        "bare": {"remote memory write by ucp_put*": ["0..inf: cma/memory"]},  # loopback left out
        "plane": {"active message by ucp_am_send*": ["0: tcp/lo", "16516..inf: tcp/lo"]},
    }


def test_shares_are_taken_pair_by_pair() -> None:
    times = [0.010, 0.020, 0.040]  # the path's round trips
    computed = [0.0, 0.010, 0.0]  # the expert's own compute time in each
    bare = [0.010, 0.010, 0.020]  # the reference's, paired
    f = figures(Shape(), 1024, times, computed, bare, [{}])
    assert f["ms"] == pytest.approx(20.0) and f["bare_ms"] == pytest.approx(10.0)
    assert f["share"] == pytest.approx(0.5)  # pairs: 1.0, 0.5, 0.5
    assert f["share_p90"] == pytest.approx(1.0)
    assert f["transfer_share"] == pytest.approx(1.0)  # pairs: 1.0, 1.0 (20 ms less 10 computed), 0.5
    assert f["transfer_share_p10"] == pytest.approx(0.5)


@pytest.mark.skipif(bool(nixl_missing()), reason=nixl_missing() or "NIXL")
def test_a_tiny_run_pairs_every_nixl_round_trip_with_bare_ucx(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nixl_dataplane.py"), "--tokens", "8", "--iters", "2",
         "--json", str(out)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (head,) = [r["head"] for r in json.loads(out.read_text())["rounds"]]
    for path in ("nixl loop", "nixl hot"):
        assert head[path]["8"]["bare_ms"] > 0 and head[path]["8"]["share"] > 0
    assert "remote memory write by ucp_put*" in str(head["ucx_protocols"]["plane"])
