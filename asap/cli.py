"""The ``asap`` command: one entry point, one module per subcommand under ``asap.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from asap.errors import AsapError

# Subcommand name -> module under asap.commands providing ``add_parser(subparsers)``; each parser sets
# ``func`` (args -> exit code) as its default.
COMMANDS: tuple[str, ...] = ("up", "serve", "prefill", "model", "bench", "trace", "calibrate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asap", description="ASAP: asynchronous disaggregated MoE prefill")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"asap.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"asap.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except AsapError as exc:
        print(f"asap: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
