"""The ``asap`` command: one entry point, one module per subcommand under ``asap.commands``.

Only the module of the command being run is imported: ``asap --help`` lists the commands from
``asap.commands.SUMMARIES`` alone, and ``asap prefill`` loads the client but never torch, which the
serving and model commands import (seconds of start-up for a request of milliseconds).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

from asap.commands import SUMMARIES
from asap.errors import AsapError

COMMANDS: tuple[str, ...] = tuple(SUMMARIES)
"""Subcommand names; each is a module under asap.commands providing ``add_parser(subparsers)``, whose
parser sets ``func`` (args -> exit code) as its default."""


def build_parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``asap`` parser with the options of the commands in ``full`` (None: every command).

    The other commands are listed by name and summary only, without importing their modules; such a
    parser can parse only the commands in ``full``.
    """
    parser = argparse.ArgumentParser(prog="asap", description="ASAP: asynchronous disaggregated MoE prefill")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if full is not None and name not in full:
            subparsers.add_parser(name, help=SUMMARIES[name])
            continue
        try:
            module = importlib.import_module(f"asap.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"asap.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # The top-level parser has no option that takes a value, so a command, if any, comes first.
    command = args_list[0] if args_list and args_list[0] in SUMMARIES else None
    parser = build_parser([command] if command else [])
    args = parser.parse_args(args_list)
    if command in ("serve", "up"):  # rank processes (and the ones `up` starts): before CUDA initialises
        from asap.dataplane.gpu_streams import configure_cuda_connections

        configure_cuda_connections()
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
