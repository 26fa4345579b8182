"""``asap --help`` and ``asap prefill`` import neither torch nor the model (seconds of start-up for a
millisecond request); the commands that need them still get their full parsers.

Each check runs in a fresh interpreter: this one has torch loaded by other tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from asap.cli import COMMANDS, build_parser
from asap.commands import SUMMARIES

HEAVY = ("torch", "numpy", "safetensors", "asap.model")
"""What neither path may load: torch and what pulls it in, and numpy (the benchmark's)."""


def run_fresh(code: str) -> subprocess.CompletedProcess[str]:
    check = f"loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)\nassert not loaded, loaded"
    return subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\n{check}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_every_command_without_importing_them() -> None:
    done = run_fresh(
        "from asap.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "assert not [m for m in sys.modules if m.startswith('asap.commands.')], 'a command module was loaded'"
    )
    assert done.returncode == 0, done.stderr
    for name, summary in SUMMARIES.items():
        assert name in done.stdout and summary.split()[0] in done.stdout


def test_prefill_reaches_its_rpc_without_torch_or_the_model() -> None:
    # An unreachable target: the command goes all the way to the RPC and fails there, with exit code 2.
    done = run_fresh(
        "from asap.cli import main\n"
        "code = main(['prefill', '--target', '127.0.0.1:1', '--timeout', '2', '--retries', '0', 'hello'])\n"
        "assert code == 2, code\n"
        "assert 'asap.client' in sys.modules"
    )
    assert done.returncode == 0, done.stderr
    assert "UNAVAILABLE" in done.stderr


@pytest.mark.parametrize("command", ["prefill", "trace"])
def test_light_commands_parse_their_help_without_torch(command: str) -> None:
    done = run_fresh(
        "from asap.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: asap {command}" in done.stdout


def test_the_full_parser_has_every_command_with_its_own_summary() -> None:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    assert tuple(helps) == COMMANDS == tuple(SUMMARIES)
    assert helps == SUMMARIES
    # Every command parses in full; a parser built for one command only knows that one's options.
    assert parser.parse_args(["up", "--attention", "3"]).attention == 3
    only_prefill = build_parser(["prefill"])
    assert only_prefill.parse_args(["prefill", "--tokens", "1,2", "--retries", "0"]).tokens == [1, 2]
    with pytest.raises(SystemExit):
        only_prefill.parse_args(["up", "--attention", "3"])
