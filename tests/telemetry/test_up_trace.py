"""``asap up --trace`` and the ``trace`` key of a cluster spec reach ``ClusterSpec.trace``."""

from __future__ import annotations

import argparse
from pathlib import Path

from asap.cluster import load_cluster_yaml
from asap.commands import up


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_parser(parser.add_subparsers())
    return parser.parse_args(["up", *argv])


def test_trace_flag() -> None:
    assert up.spec_from_args(_args("--trace", "t.jsonl")).trace == "t.jsonl"
    assert up.spec_from_args(_args()).trace is None


def test_trace_in_yaml_and_flag_wins(tmp_path: Path) -> None:
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text("trace: from-file.jsonl\ncompute: emulated:h200\n")
    assert load_cluster_yaml(spec_file).trace == "from-file.jsonl"
    assert load_cluster_yaml(spec_file).compute == "emulated:h200"
    assert up.spec_from_args(_args("--config", str(spec_file), "--trace", "flag.jsonl")).trace == "flag.jsonl"
