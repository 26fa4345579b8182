"""Reduce a deployment's `asap serve` commands to the topology they form, and build what `asap up` forms.

Every argv is parsed by the real `asap.cli.build_parser()`. Addresses in `--experts` / `--attention` are
resolved to (kind, rank) through the host names and `--port` of the deployment's own services, so a
list that names a wrong port, an unknown host or the ranks out of order shows up as a different topology.
Host, port and thread flags are where deployments legitimately differ from `asap up`; they are left out
(whether the scheduler serves the OpenAI HTTP API, and under which model name, is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

from asap.cli import build_parser
from asap.cluster import ClusterSpec, attention_commands, expert_commands, scheduler_command
from asap.openai_protocol import served_model_name
from tests.deploy.deployments import ServiceArgv


@dataclass(frozen=True)
class Process:
    """What one service process is, independent of where it runs."""

    kind: str
    rank: int
    model: str
    num_ranks: int | None = None
    experts: tuple[int, ...] | None = None
    """expert ranks, in the order the attention rank lists them"""
    attention: tuple[int, ...] | None = None
    """attention ranks, in the order the scheduler lists them"""
    mode: str | None = None
    dtype: str | None = None
    device: str | None = None
    served_model: str | None = None
    """the scheduler's OpenAI HTTP model name, None without --http-port"""
    max_batch_tokens: int | None = None
    """the scheduler's --max-batch-tokens"""


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse with the real CLI; a rejected command raises ValueError with argparse's message."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(list(argv))
    except SystemExit as exc:
        raise ValueError(
            f"`asap {' '.join(argv)}` is rejected by asap's parser: {errors.getvalue()}"
        ) from exc


def topology(services: Sequence[ServiceArgv]) -> set[Process]:
    """The processes ``services`` start; raises ValueError for a command or address that doesn't fit."""
    parsed = [(service, parse(service.argv)) for service in services]
    by_address: dict[str, tuple[str, int]] = {}
    for service, args in parsed:
        if args.command != "serve":
            raise ValueError(f"{service.name}: not an `asap serve` command")
        rank = 0 if args.service == "scheduler" else args.rank
        for host in service.hosts:
            by_address[f"{host}:{args.port}"] = (args.service, rank)

    def ranks(targets: str, kind: str, who: str) -> tuple[int, ...]:
        resolved = []
        for target in (t.strip() for t in targets.split(",")):
            if by_address.get(target, ("", -1))[0] != kind:
                raise ValueError(f"{who}: {target!r} is no {kind} service of this deployment")
            resolved.append(by_address[target][1])
        return tuple(resolved)

    processes = set()
    for service, args in parsed:
        if args.service == "expert":
            process = Process("expert", args.rank, args.model, num_ranks=args.num_ranks,
                              dtype=args.dtype, device=args.device)  # fmt: skip
        elif args.service == "attention":
            process = Process("attention", args.rank, args.model, dtype=args.dtype, device=args.device,
                              experts=ranks(args.experts, "expert", service.name))  # fmt: skip
        else:
            served = None
            if args.http_port is not None:
                served = args.served_model_name or served_model_name(args.model)
            process = Process("scheduler", 0, args.model, mode=args.mode, served_model=served,
                              max_batch_tokens=args.max_batch_tokens,
                              attention=ranks(args.attention, "attention", service.name))  # fmt: skip
        if process in processes:
            raise ValueError(f"{service.name}: a second {process.kind} rank {process.rank}")
        processes.add(process)
    check_complete(processes)
    return processes


def check_complete(processes: set[Process]) -> None:
    """Ranks 0..n-1 of each kind, one scheduler, every list naming every rank in rank order."""
    ranks = {kind: sorted(p.rank for p in processes if p.kind == kind) for kind in ("expert", "attention")}
    for kind, found in ranks.items():
        if found != list(range(len(found))) or not found:
            raise ValueError(f"{kind} ranks are {found}, not 0..n-1")
    if sum(p.kind == "scheduler" for p in processes) != 1:
        raise ValueError("not exactly one scheduler")
    for process in processes:
        if process.num_ranks is not None and process.num_ranks != len(ranks["expert"]):
            raise ValueError(
                f"expert {process.rank}: --num-ranks {process.num_ranks}, {len(ranks['expert'])} ranks"
            )
        if process.experts is not None and list(process.experts) != ranks["expert"]:
            raise ValueError(
                f"attention {process.rank} lists experts {process.experts}, not {ranks['expert']}"
            )
        if process.attention is not None and list(process.attention) != ranks["attention"]:
            raise ValueError(f"the scheduler lists attention {process.attention}, not {ranks['attention']}")


def asap_up_topology(spec: ClusterSpec, model: str) -> set[Process]:
    """The processes `asap up` starts for ``spec``, through asap.cluster's own command builders."""
    experts = expert_commands(spec, model)
    expert_targets = [f"{c.name}:{r}" for r, c in enumerate(experts)]
    attention = attention_commands(spec, model, expert_targets)
    attention_targets = [f"{c.name}:{r}" for r, c in enumerate(attention)]
    scheduler = scheduler_command(spec, model, attention_targets)
    services = [
        ServiceArgv(c.name, tuple(c.argv), frozenset({c.name})) for c in [*experts, *attention, scheduler]
    ]
    # asap up binds port 0 and learns addresses at run time; give each rank a distinct stand-in port.
    fixed = []
    for service in services:
        argv = list(service.argv)
        rank = argv[argv.index("--rank") + 1] if "--rank" in argv else "0"
        argv[argv.index("--port") + 1] = rank
        fixed.append(ServiceArgv(service.name, tuple(argv), service.hosts))
    return topology(fixed)
