"""Check that the committed gRPC stubs match the .proto files.

``python -m asap.tools.proto_check`` regenerates the stubs with ``grpc_tools.protoc`` using the flags of
``make proto`` into a temporary directory and compares them byte for byte with ``asap/v1/*.py|*.pyi``.
It exits 1 listing every differing, missing or stale file, 0 when all match.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["compare_stubs", "generate_stubs", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path("asap/v1")
"""Where the stubs live, relative to both the proto include root and the repository root."""

_STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate_stubs(proto_dir: Path, out_dir: Path) -> None:
    """Run protoc over every ``*.proto`` under ``proto_dir/asap/v1`` into ``out_dir`` (make proto's flags)."""
    protos = sorted(str(p.relative_to(proto_dir)) for p in (proto_dir / PACKAGE).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir / PACKAGE}")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out", str(out_dir)]
    cmd += ["--pyi_out", str(out_dir), "--grpc_python_out", str(out_dir), *protos]
    # Run from proto_dir with relative names, as `make proto` does, so the paths embedded in the
    # generated files are the same.
    done = subprocess.run(cmd, cwd=proto_dir, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed ({done.returncode}): {done.stderr.strip()}")


def _stubs(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name.endswith(_STUB_SUFFIXES)
    }


def compare_stubs(proto_dir: Path, stub_dir: Path) -> list[str]:
    """Return ``'NAME: reason'`` for every stub in ``stub_dir`` that differs from what ``proto_dir`` makes.

    ``proto_dir`` is the include root (holding ``asap/v1/*.proto``); ``stub_dir`` holds the stubs of that
    package (``asap/v1``). An empty list means the stubs are up to date.
    """
    with tempfile.TemporaryDirectory(prefix="asap-proto-check-") as tmp:
        generate_stubs(proto_dir, Path(tmp))
        fresh = _stubs(Path(tmp) / PACKAGE)
    committed = _stubs(stub_dir)
    problems = []
    for name in sorted(fresh.keys() | committed.keys()):
        if name not in committed:
            problems.append(f"{name}: missing (run `make proto`)")
        elif name not in fresh:
            problems.append(f"{name}: stale, no .proto generates it")
        elif fresh[name] != committed[name]:
            problems.append(f"{name}: differs from the generated version (run `make proto`)")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m asap.tools.proto_check", description=__doc__)
    parser.add_argument("--proto-dir", type=Path, default=REPO_ROOT / "proto", help="proto include root")
    parser.add_argument("--stub-dir", type=Path, default=REPO_ROOT / PACKAGE, help="committed stubs")
    args = parser.parse_args(argv)
    problems = compare_stubs(args.proto_dir, args.stub_dir)
    for problem in problems:
        print(f"{args.stub_dir}/{problem}")
    if problems:
        print(f"{len(problems)} stub file(s) out of date", file=sys.stderr)
        return 1
    print(f"stubs in {args.stub_dir} match {args.proto_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
