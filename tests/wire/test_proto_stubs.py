"""The committed gRPC stubs match the .proto files, and the check notices when they do not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asap.tools.proto_check import PACKAGE, REPO_ROOT, compare_stubs, main

PROTO_DIR = REPO_ROOT / "proto"
STUB_DIR = REPO_ROOT / PACKAGE


def test_committed_stubs_are_up_to_date() -> None:
    assert compare_stubs(PROTO_DIR, STUB_DIR) == []


def test_module_entry_point_exits_zero() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asap.tools.proto_check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_proto_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    protos = tmp_path / "proto"
    shutil.copytree(PROTO_DIR, protos)
    common = protos / PACKAGE / "common.proto"
    common.write_text(common.read_text() + "\nmessage AddedByTheTest { int32 x = 1; }\n")
    problems = compare_stubs(protos, STUB_DIR)
    assert sorted(p.split(":")[0] for p in problems) == ["common_pb2.py", "common_pb2.pyi"]
    assert main(["--proto-dir", str(protos), "--stub-dir", str(STUB_DIR)]) == 1
    assert "common_pb2.pyi: differs" in capsys.readouterr().out


def test_missing_and_stale_stubs_are_reported(tmp_path: Path) -> None:
    stubs = tmp_path / "v1"
    shutil.copytree(STUB_DIR, stubs)
    (stubs / "expert_pb2_grpc.py").unlink()
    (stubs / "removed_pb2.py").write_text("# generated from a proto that no longer exists\n")
    assert compare_stubs(PROTO_DIR, stubs) == [
        "expert_pb2_grpc.py: missing (run `make proto`)",
        "removed_pb2.py: stale, no .proto generates it",
    ]
