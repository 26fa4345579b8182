"""Container health check: exit 0 when a service's grpc health reports SERVING, 1 otherwise.

    python -m asap.tools.healthcheck [HOST:PORT] [--service NAME] [--timeout S]

Images have no ``grpc_health_probe`` binary, so Docker's HEALTHCHECK and compose use this. With no target
it reads the container's own command (PID 1, ``asap serve KIND [--host H] [--port P]``) so one image-level
HEALTHCHECK fits all three services; a service bound to ``0.0.0.0`` is checked on loopback. It imports
only grpc (no torch): it runs every few seconds beside the service.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_PORTS = {"scheduler": 50051, "attention": 50061, "expert": 50071}
"""``asap serve KIND`` default ports (asap.commands.serve)."""
_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


def target_from_command(argv: Sequence[str]) -> str | None:
    """The address a service started as ``argv`` answers on, or None if ``argv`` is no ``asap serve``."""
    args = list(argv)
    try:
        kind = args[args.index("serve") + 1]
    except (ValueError, IndexError):
        return None
    if kind not in DEFAULT_PORTS:
        return None
    host, port = "127.0.0.1", str(DEFAULT_PORTS[kind])
    for i, arg in enumerate(args):
        for flag in ("--host", "--port"):
            value = None
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is None:
                continue
            if flag == "--port":
                port = value
            elif value not in _WILDCARD_HOSTS:
                host = value
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def own_command(pid: int = 1) -> list[str]:
    """The command line of ``pid`` (the container's main process), empty if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def check(target: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """Ask ``target``'s grpc health for ``service``; returns (serving, status or error text)."""
    import grpc

    from asap.rpc.health import check_health

    with grpc.insecure_channel(target) as channel:
        return check_health(channel, service, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asap.tools.healthcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("target", nargs="?", help="HOST:PORT (default: from this container's `asap serve`)")
    parser.add_argument("--service", default="", help="grpc health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    target = args.target or target_from_command(own_command())
    if target is None:
        print("healthcheck: no target given and PID 1 is not `asap serve ...`", file=sys.stderr)
        return 2
    serving, status = check(target, args.service, args.timeout)
    print(f"{target}: {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
