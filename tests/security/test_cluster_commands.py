"""``asap up --tls DIR --auth-token-file F``: what the cluster spec passes to each service."""

from __future__ import annotations

from pathlib import Path

from asap.cli import build_parser
from asap.clusterspec import (
    ClusterSpec,
    attention_commands,
    expert_commands,
    load_cluster_yaml,
    scheduler_command,
)
from asap.commands.serve import scheduler_config, tls_config
from asap.rpc.tls import TlsConfig


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_each_service_gets_its_own_certificate_and_the_scheduler_the_tokens(tmp_path: Path) -> None:
    spec = ClusterSpec(attention=1, experts=2, tls=str(tmp_path), auth_token_file=str(tmp_path / "tokens"))
    (tmp_path / "expert").mkdir()
    (tmp_path / "expert" / "tls.crt").write_text("")
    commands = [*expert_commands(spec, "m"), *attention_commands(spec, "m", ["e:1", "e:2"]),
                scheduler_command(spec, "m", ["a:1"])]  # fmt: skip
    for command in commands:
        role = command.name.split("-")[0]
        args = build_parser().parse_args(command.argv)
        expected = TlsConfig.from_dir(tmp_path, role)
        assert tls_config(args, role) == expected, command.name
        assert _flag(command.argv, "--tls-ca") == str(expected.ca)
    scheduler = build_parser().parse_args(commands[-1].argv)
    assert scheduler_config(scheduler).auth_token_file == str(tmp_path / "tokens")
    assert all("--auth-token-file" not in c.argv for c in commands[:-1])


def test_without_tls_no_flag_is_passed() -> None:
    spec = ClusterSpec(attention=1, experts=1)
    for command in (*expert_commands(spec, "m"), scheduler_command(spec, "m", ["a:1"])):
        assert not any(arg.startswith(("--tls", "--auth")) for arg in command.argv)


def test_yaml_keys(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("tls: /etc/asap/tls\nauth_token_file: /etc/asap/tokens\n")
    spec = load_cluster_yaml(path)
    assert spec.tls == "/etc/asap/tls" and spec.auth_token_file == "/etc/asap/tokens"
    assert load_cluster_yaml(path, {"tls": "/other"}).tls == "/other"
