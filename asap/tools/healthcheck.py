"""Container health check: exit 0 when a service's grpc health reports SERVING, 1 otherwise.

    python -m asap.tools.healthcheck [HOST:PORT] [--service NAME] [--timeout S] [--tls DIR]

Images have no ``grpc_health_probe`` binary, so Docker's HEALTHCHECK and compose use this. With no target
it reads the container's own command (PID 1, ``asap serve KIND [--host H] [--port P]``) so one image-level
HEALTHCHECK fits all three services; a service bound to ``0.0.0.0`` is checked on loopback. A service
with mutual TLS refuses a plaintext check, so the check presents the service's own certificate: the
``--tls-cert/--tls-key/--tls-ca`` of PID 1's command, else ``$ASAP_TLS_DIR`` (compose and Kubernetes set
it), else ``--tls DIR``. It imports only grpc (no torch): it runs every few seconds beside the service.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asap.rpc.tls import TlsConfig

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


def _flag(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``), None if absent."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def tls_from_command(argv: Sequence[str], env: dict[str, str] | None = None) -> TlsConfig | None:
    """The TLS identity of the service started as ``argv`` (its flags, else ``$ASAP_TLS_DIR``), or None."""
    from asap.rpc.tls import tls_from_flags

    args = list(argv)
    kind = args[args.index("serve") + 1] if "serve" in args[:-1] else "client"
    return tls_from_flags(
        _flag(args, "--tls-cert"), _flag(args, "--tls-key"), _flag(args, "--tls-ca"), role=kind, env=env
    )


def own_command(pid: int = 1) -> list[str]:
    """The command line of ``pid`` (the container's main process), empty if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def check(
    target: str, service: str = "", timeout_s: float = 3.0, tls: TlsConfig | None = None
) -> tuple[bool, str]:
    """Ask ``target``'s grpc health for ``service`` (over mutual TLS with ``tls``); returns (serving,
    status or error text)."""
    from asap.rpc.channels import blocking_channel
    from asap.rpc.health import check_health

    with blocking_channel(target, tls) as channel:
        return check_health(channel, service, timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asap.tools.healthcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("target", nargs="?", help="HOST:PORT (default: from this container's `asap serve`)")
    parser.add_argument("--service", default="", help="grpc health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument(
        "--tls",
        metavar="DIR",
        default=None,
        help="TLS directory when PID 1's command and $ASAP_TLS_DIR name none",
    )
    args = parser.parse_args(argv)
    command = own_command()
    target = args.target or target_from_command(command)
    if target is None:
        print("healthcheck: no target given and PID 1 is not `asap serve ...`", file=sys.stderr)
        return 2
    from asap.rpc.tls import TlsConfig

    tls = tls_from_command(command) or (TlsConfig.from_dir(args.tls) if args.tls else None)
    serving, status = check(target, args.service, args.timeout, tls)
    print(f"{target}: {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
