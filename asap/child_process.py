"""One service of a local cluster as a child process: started with ``python -m asap.cli``, its output
forwarded line by line with a ``[service]`` prefix, its ready address read from that output.

A service prints ``serving ... at HOST:PORT`` once it reports SERVING (after ``metrics of ... at URL`` when
it serves metrics, and the scheduler's ``serving openai http at URL`` when it serves HTTP); the launcher
then confirms with a grpc health check (``wait_healthy``). A child that exits before its ready line fails
``wait_ready`` with its last lines, so the caller can say why.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, TextIO

from asap.clusterspec import ServiceCommand
from asap.errors import Unavailable

if TYPE_CHECKING:
    from asap.rpc.tls import TlsConfig

READY_LINE = re.compile(r"^serving (?P<what>.+) at (?P<address>\S+)$")
HTTP_LINE = re.compile(r"^serving openai http at (?P<url>\S+)$")
"""The scheduler's HTTP front door (``scheduler_svc.http_server.HTTP_READY_LINE``), before READY_LINE."""
METRICS_LINE = re.compile(r"^metrics of (?P<what>.+) at (?P<url>\S+)$")
"""What a service started with ``--metrics-port`` prints before its ready line."""


class ChildProcess:
    """One service child: its output forwarded with a prefix, its ready address captured."""

    def __init__(self, command: ServiceCommand, out: TextIO, env: dict[str, str] | None = None) -> None:
        self.name = command.name
        self.command = command
        self.started_at = time.monotonic()
        self.tail: deque[str] = deque(maxlen=40)
        self.address: str | None = None
        self.http_url: str | None = None
        """The OpenAI HTTP front door's base URL, when this child serves one."""
        self.metrics_url: str | None = None
        """``http://HOST:PORT/metrics`` when the child serves metrics (known once it is ready)."""
        self._ready = threading.Event()
        self._out = out
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asap.cli", *command.argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # our signals reach children only through stop()
        )
        self._forwarder = threading.Thread(target=self._forward, name=f"log-{self.name}", daemon=True)
        self._forwarder.start()

    def _forward(self) -> None:
        if self.proc.stdout is None:
            return
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.tail.append(line)
            http = HTTP_LINE.match(line)  # not the ready line, though it has its shape
            if http and self.http_url is None:
                self.http_url = http.group("url")
            metrics = METRICS_LINE.match(line)
            if metrics and self.metrics_url is None:
                self.metrics_url = metrics.group("url")
            match = None if http or metrics else READY_LINE.match(line)
            if match and self.address is None:
                self.address = match.group("address")
                self._ready.set()
            print(f"[{self.name}] {line}", file=self._out, flush=True)
        self._ready.set()

    def wait_ready(self, deadline: float) -> str:
        """Block until the ready line; raise ``Unavailable`` with the child's output if it exits first."""
        self._ready.wait(max(0.0, deadline - time.monotonic()))
        if self.address is None:
            try:  # the output ended: the child is exiting; give it a moment to be reaped
                code: int | None = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            state = f"exited with code {code}" if code is not None else "did not become ready in time"
            raise Unavailable(f"{self.name} {state}; its last output:\n" + "\n".join(self.tail))
        return self.address

    def close(self) -> None:
        """Release the output pipe once the process has exited."""
        self._forwarder.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def pinned_command(self) -> ServiceCommand:
        """This child's command with its port fixed to the one it bound, so a restart keeps its address."""
        argv = list(self.command.argv)
        if self.address is not None and "--port" in argv:
            argv[argv.index("--port") + 1] = self.address.rpartition(":")[2]
        return ServiceCommand(self.name, argv)

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


def wait_healthy(address: str, deadline: float, tls: TlsConfig | None = None) -> None:
    """Poll grpc health of ``address`` until SERVING or the deadline (over mutual TLS with ``tls``)."""
    from asap.rpc.channels import blocking_channel
    from asap.rpc.health import check_health

    with blocking_channel(address, tls) as channel:
        while True:
            if check_health(channel, timeout_s=2.0)[0]:
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"{address} did not report SERVING in time")
            time.sleep(0.1)


__all__ = ["HTTP_LINE", "METRICS_LINE", "READY_LINE", "ChildProcess", "wait_healthy"]
