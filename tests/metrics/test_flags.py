"""``--metrics-port`` on ``asap serve`` and ``asap up``, and the ports ``asap up`` gives each service."""

from __future__ import annotations

from pathlib import Path

import pytest

from asap.cli import build_parser
from asap.cluster import (
    ClusterSpec,
    attention_commands,
    expert_commands,
    load_cluster_yaml,
    scheduler_command,
)
from asap.commands.serve import attention_config, expert_config, scheduler_config
from asap.commands.up import spec_from_args
from asap.errors import InvalidArgument


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(list(argv))


def test_serve_has_no_metrics_server_unless_asked() -> None:
    args = parse("serve", "scheduler", "--attention", "a:1", "--cost", "1,0,0")
    assert scheduler_config(args).metrics_port is None
    assert attention_config(parse("serve", "attention", "--experts", "e:1")).metrics_port is None
    assert expert_config(parse("serve", "expert")).metrics_port is None


@pytest.mark.parametrize("port", ["0", "9400"])
def test_serve_takes_a_metrics_port(port: str) -> None:
    args = parse("serve", "scheduler", "--attention", "a:1", "--cost", "1,0,0", "--metrics-port", port)
    assert scheduler_config(args).metrics_port == int(port)
    args = parse("serve", "attention", "--experts", "e:1", "--metrics-port", port)
    assert attention_config(args).metrics_port == int(port)
    assert expert_config(parse("serve", "expert", "--metrics-port", port)).metrics_port == int(port)


@pytest.mark.parametrize("bad", ["-1", "65536", "http"])
def test_a_bad_metrics_port_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("serve", "expert", "--metrics-port", bad)
    assert "--metrics-port" in capsys.readouterr().err


def argv_port(argv: list[str]) -> int | None:
    return int(argv[argv.index("--metrics-port") + 1]) if "--metrics-port" in argv else None


def commands(spec: ClusterSpec) -> dict[str, list[str]]:
    experts = expert_commands(spec, "tiny")
    attention = attention_commands(spec, "tiny", ["e:1"] * spec.experts)
    return {
        c.name: c.argv
        for c in [scheduler_command(spec, "tiny", ["a:1"] * spec.attention), *attention, *experts]
    }


def test_up_gives_the_scheduler_the_port_and_the_others_the_next_ones() -> None:
    spec = spec_from_args(parse("up", "--attention", "2", "--experts", "3", "--metrics-port", "9400"))
    ports = {name: argv_port(argv) for name, argv in commands(spec).items()}
    assert ports == {
        "scheduler": 9400,
        "attention-0": 9401,
        "attention-1": 9402,
        "expert-0": 9403,
        "expert-1": 9404,
        "expert-2": 9405,
    }
    for argv in commands(spec).values():  # every command still parses, the flag after the subcommand
        assert parse(*argv).metrics_port == argv_port(argv)


def test_up_port_zero_gives_every_service_a_free_port() -> None:
    spec = spec_from_args(parse("up", "--metrics-port", "0"))
    assert {argv_port(argv) for argv in commands(spec).values()} == {0}


def test_up_without_the_flag_starts_no_metrics_server() -> None:
    spec = spec_from_args(parse("up"))
    assert all("--metrics-port" not in argv for argv in commands(spec).values())


def test_a_port_without_room_for_every_service_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="metrics_port"):
        ClusterSpec(attention=2, experts=2, metrics_port=65533)


def test_the_yaml_spec_takes_metrics_port(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("metrics_port: 9500\nattention: {count: 1}\nexperts: {count: 1}\n")
    assert load_cluster_yaml(path).metrics_ports() == {
        "scheduler": 9500,
        "attention-0": 9501,
        "expert-0": 9502,
    }
    path.write_text("metrics_port: nine\n")
    with pytest.raises(InvalidArgument, match="metrics_port must be an integer"):
        load_cluster_yaml(path)
