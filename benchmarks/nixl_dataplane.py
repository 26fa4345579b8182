"""Per-layer dispatch + combine between processes: the NIXL data plane against gRPC bytes, and the NIXL
path's bytes/s against UCX's own (a bare NIXL/UCX ping-pong of the same bytes) paired round trip by round
trip; with ``--base REV`` the same measurement of the code at git revision REV in the same run (A/B,
alternating by round).

The expert rank is the real ``expert_svc`` in its own process (``--data-plane auto``: it accepts NIXL
links when NIXL is installed) with a model whose experts are almost free to compute (hidden 2048, 8
experts of intermediate width 16, one layer, top-8), and every row's expert slots say -1 (another rank's),
so it computes next to nothing. The attention side (``benchmarks/nixl_paths.py``) runs in a child
process with the tree under test: ``grpc`` (bytes), ``nixl loop`` (``exchange`` on the event loop: sync
modes and other callers) and ``nixl hot`` (the async-mode path: the compute thread posts and polls), the
latter only where the code has it; fresh dispatch tensors every layer, as ``split_by_rank`` makes them.
The two NIXL paths are timed after ``LINK_WARMUP`` untimed round trips of both, in an order that
alternates by round (the first round trips after set-up cost more on either path).

Like with like (``benchmarks/nixl_bare.py``): the reference is two bare NIXL agents configured as the
plane's, between that child and a child of its own, with the same UCX environment, WRITing exactly the
bytes the plane moves, one WRITE plus notification each way, polled with the planes' back-off; one bare
round trip right before or after every NIXL round trip (alternating), so load drift on a shared host hits
both alike. Per pair, *share* = bare's time / the path's (the path's bytes/s as a share of UCX's), and
*transfer share* = bare's time / (the path's less the expert rank's own compute time of it); the
figures are medians with p10-p90 spread. The UCX protocols each endpoint chose (``UCX_PROTO_INFO=y``
in the child: transport per operation, e.g. ``cma/memory`` puts and ``tcp/lo`` active messages) are
printed for the bare agents and for the plane's, so one sees they run on the same transports.

    python3 benchmarks/nixl_dataplane.py --base HEAD~1 --json /tmp/nixl_dataplane.json
    UCX_TLS=tcp python3 benchmarks/nixl_dataplane.py --json /tmp/nixl_dataplane_tcp.json
    python3 benchmarks/nixl_dataplane.py --device cuda:0 --tokens 1024,8192   # both ranks on one GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = os.environ.get("ASAP_BENCH_ROOT") or str(_HERE.parent)  # the tree under test (a child's A or B)
sys.path[:0] = [_ROOT, str(_HERE)]  # that tree's asap; this benchmark's own helpers beside it

import torch
from nixl_paths import Shape, count_compute, time_paths


async def _child(args: argparse.Namespace, tokens: list[int]) -> dict[str, object]:
    """One tree's measurement (this process runs that tree's code; so does its expert process)."""
    from nixl_bare import BarePair

    from asap.model.tiny import make_tiny
    from tests.procs import ServiceProcess

    count_compute()
    shape = Shape(dtype=getattr(torch, args.dtype), device=torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(
            Path(tmp) / "m", layers=1, hidden=shape.hidden, experts=8, top_k=shape.top_k,
            expert_intermediate=16, heads=16,
        )  # fmt: skip
        argv = ["-m", "expert_svc", "--model", str(model), "--port", "0", "--dtype", args.dtype]
        argv += ["--device", args.device]
        proc = ServiceProcess("expert", argv)
        bare = None
        try:
            target = proc.wait_ready()
            results: dict[str, object] = {}
            for plane in ("grpc", "nixl"):
                if plane == "nixl":
                    bare = BarePair(max(sum(shape.sizes(n)) for n in tokens), shape.device)
                figures = await time_paths(
                    target, plane, tokens, args.iters, shape, bare, hot_first=args.hot_first
                )
                for path, by_tokens in figures.items():
                    results[f"{plane} {path}" if plane == "nixl" else plane] = by_tokens
            import asap.dataplane.nixl_plane as tree

            results["code"] = tree.__file__  # which tree this child ran
            return results
        finally:
            if bare is not None:
                bare.close()
            proc.stop()


_PROTO_HEAD = re.compile(r"\|\s+(\S+)\s+(intra-node|inter-node|self)\s+cfg#\d+\s+\|")
_PROTO_ROW = re.compile(r"\|\s*([0-9.]+(?:inf)?|0\.\.inf|\d+\.\.\S+)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|")


def ucx_protocols(text: str) -> dict[str, dict[str, list[str]]]:
    """The transports UCX chose per agent kind (``bare``: the ping-pong's, ``plane``: ASAP's) and
    operation, between processes (``UCX_PROTO_INFO=y`` tables; loopback ones left out)."""
    out: dict[str, dict[str, list[str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head = _PROTO_HEAD.search(line)
        if head is None or head.group(2) == "self" or i + 1 >= len(lines):
            continue
        kind = "bare" if head.group(1) in ("ping", "pong") else "plane"
        operation = lines[i + 1].split("|")[1].strip() if lines[i + 1].count("|") >= 2 else "?"
        operation = re.sub(r" from .*", "", operation)
        configs: list[str] = []
        for row in lines[i + 2 : i + 12]:
            m = _PROTO_ROW.search(row)
            if m and m.group(1) != "Range":
                configs.append(f"{m.group(1)}: {m.group(3)}")
            elif configs and "+--" in row:
                break
        slot = out.setdefault(kind, {}).setdefault(operation, [])
        slot.extend(c for c in configs if c not in slot)
    return out


def _tree(rev: str, into: str) -> str:
    """The repository at ``rev``, unpacked into ``into`` (the A side of an A/B)."""
    archive = subprocess.run(
        ["git", "-C", str(_HERE.parent), "archive", rev], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def _measure(root: str, args: argparse.Namespace, hot_first: bool = False) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        # the tree measured first on the path; the rest kept (packages installed with --target, as on
        # the GPU machine, live there)
        path = os.pathsep.join([root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
        env = dict(os.environ, ASAP_BENCH_ROOT=root, PYTHONPATH=path, UCX_PROTO_INFO="y")
        argv = ["--child", out.name, "--tokens", args.tokens, "--iters", str(args.iters)]
        argv += ["--dtype", args.dtype, "--device", args.device] + (["--hot-first"] if hot_first else [])
        done = subprocess.run(
            [sys.executable, __file__, *argv], env=env, check=True, stdout=subprocess.PIPE, text=True
        )
        result: dict[str, object] = json.loads(Path(out.name).read_text())
        result["ucx_protocols"] = ucx_protocols(done.stdout)
        return result


def _load() -> str:
    return Path("/proc/loadavg").read_text().strip() if os.path.exists("/proc/loadavg") else "?"


def run(args: argparse.Namespace, tokens: list[int]) -> dict[str, object]:
    from nixl_bare import ucx_transports

    results: dict[str, object] = {
        "hidden": Shape().hidden, "dtype": args.dtype, "top_k": Shape().top_k, "iters": args.iters,
        "device": args.device, "ucx": ucx_transports(), "load_before": _load(), "base": args.base,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"head": str(_HERE.parent)}
        if args.base:
            trees = {"base": _tree(args.base, tmp), **trees}
        rounds: list[dict[str, object]] = []
        for r in range(args.rounds):
            one: dict[str, object] = {}
            order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
            for name, root in order:
                print(f"  round {r + 1}: {name} (load {_load()})", file=sys.stderr, flush=True)
                one[name] = _measure(root, args, hot_first=r % 2 == 1)  # NIXL paths' order alternates
            rounds.append(one)
    results["rounds"] = rounds
    results["load_after"] = _load()
    results["summary"] = summary(rounds, tokens)
    return results


def summary(rounds: list[dict[str, object]], tokens: list[int]) -> list[str]:
    """One line per (round, tree, path, tokens), then the transports each side used."""
    lines = []
    for r, one in enumerate(rounds):
        for tree, paths in one.items():
            assert isinstance(paths, dict)
            grpc = paths["grpc"]
            for path, by_tokens in paths.items():
                if not path.startswith("nixl"):
                    continue
                for n in tokens:
                    f = by_tokens[str(n)]
                    lines.append(
                        f"round {r + 1} {tree:4s} {path:9s} {n:5d}: {f['ms']:7.2f} ms "
                        f"(p10-p90 {f['p10_ms']:.2f}-{f['p90_ms']:.2f}; {f['GB_s']:.2f} GB/s), "
                        f"grpc/this {grpc[str(n)]['ms'] / f['ms']:5.2f}x; bare UCX {f['bare_ms']:.2f} ms "
                        f"({f['bare_p10_ms']:.2f}-{f['bare_p90_ms']:.2f}); share of bare "
                        f"{f['share']:.0%} ({f['share_p10']:.0%}-{f['share_p90']:.0%}); transfer "
                        f"{f['transfer_ms']:.2f} ms (expert {f['expert_compute_ms']:.2f}) share "
                        f"{f['transfer_share']:.0%} ({f['transfer_share_p10']:.0%}-"
                        f"{f['transfer_share_p90']:.0%})"
                    )
            protocols = paths.get("ucx_protocols", {})
            assert isinstance(protocols, dict)
            for kind, operations in protocols.items():
                for operation, configs in operations.items():
                    if "memory write" in operation or operation == "active message by ucp_am_send*":
                        lines.append(
                            f"round {r + 1} {tree:4s} UCX {kind:5s} {operation}: {', '.join(configs)}"
                        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="1024,8192", help="rows per dispatch, comma-separated")
    parser.add_argument("--iters", type=int, default=20, help="timed round trips per path and size")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="both ranks' device (cuda:0: slots in GPU memory)")
    parser.add_argument("--base", help="also measure the code at this git revision (A/B in one run)")
    parser.add_argument("--rounds", type=int, default=1, help="alternations of base and head")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hot-first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.child:
        Path(args.child).write_text(json.dumps(asyncio.run(_child(args, tokens))))
        return
    results = run(args, tokens)
    print(json.dumps(results, indent=1))
    print("\n".join(results["summary"]))  # type: ignore[arg-type]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
