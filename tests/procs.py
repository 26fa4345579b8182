"""Start ASAP services as real child processes for integration tests (port 0, address read from stdout)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

_READY = re.compile(r"^serving .+ at (\S+)$")


class ServiceProcess:
    """A service child process; ``address`` is known once it printed its ready line."""

    def __init__(self, name: str, argv: Sequence[str], *, ready_timeout_s: float = 120.0) -> None:
        self.name = name
        self.log: list[str] = []
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            ASAP_LOG_LEVEL=os.environ.get("ASAP_LOG_LEVEL", "WARNING"),
            ASAP_TORCH_THREADS="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._ready = threading.Event()
        self.address = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._ready_timeout_s = ready_timeout_s

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.log.append(line)
            match = _READY.match(line)
            if match and not self._ready.is_set():
                self.address = match.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> str:
        if not self._ready.wait(self._ready_timeout_s) or not self.address:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.log[-40:]))
        return self.address

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        return self.proc.returncode


def start_cluster_services(
    model_dir: Path, *, attention: int, experts: int, extra_attention: Sequence[str] = ()
) -> tuple[list[ServiceProcess], list[ServiceProcess]]:
    """Start ``experts`` expert ranks, then ``attention`` attention ranks pointed at them."""
    expert_procs = [
        ServiceProcess(
            f"expert-{r}",
            [
                "-m",
                "expert_svc",
                "--model",
                str(model_dir),
                "--port",
                "0",
                "--rank",
                str(r),
                "--num-ranks",
                str(experts),
            ],
        )
        for r in range(experts)
    ]
    attention_procs: list[ServiceProcess] = []
    try:
        targets = ",".join(p.wait_ready() for p in expert_procs)
        attention_procs = [
            ServiceProcess(
                f"attention-{r}",
                [
                    "-m",
                    "attention_svc",
                    "--model",
                    str(model_dir),
                    "--port",
                    "0",
                    "--rank",
                    str(r),
                    "--experts",
                    targets,
                    *extra_attention,
                ],
            )
            for r in range(attention)
        ]
        for p in attention_procs:
            p.wait_ready()
    except BaseException:
        for p in (*attention_procs, *expert_procs):
            p.stop()
        raise
    return attention_procs, expert_procs
