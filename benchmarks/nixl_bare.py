"""UCX's own speed between two processes of this host: two bare NIXL agents configured as the NIXL
plane's (no progress thread, strict thread sync, the UCX backend) that WRITE each other the bytes one
plane round trip moves (out: slot header + rows + ids + weights; back: the result rows), one WRITE plus
notification each way, nothing of ASAP around them; polled with the planes' poll threads' back-off. The
reference of ``benchmarks/nixl_dataplane.py``, which runs one round trip of it beside each round trip of
the plane it measures (interleaved, same process, same UCX environment).

The peer is a child process (``python3 benchmarks/nixl_bare.py --pong FOLDER ...``) that answers every
WRITE with a WRITE of the size its notification names, or stops on ``b"stop"``. Memory is registered once
per agent (host memory, or GPU memory with ``--device cuda:N``), as UCX's own benchmarks do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from asap.dataplane.nixl_link import load_nixl
from asap.dataplane.ring import Backoff

__all__ = ["BarePair", "ucx_transports"]

_STOP = b"stop"


def ucx_transports() -> dict[str, str]:
    """The UCX settings this process runs with (``UCX_*`` variables; unset ones are UCX's choice)."""
    chosen = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    return chosen or {"UCX_TLS": "(unset: UCX's choice)"}


class _Agent:
    """A bare agent with ``nbytes`` registered on ``device``; its metadata and address go to ``folder``
    for the other process, whose own it reads back."""

    def __init__(self, name: str, peer: str, nbytes: int, folder: str, device: torch.device) -> None:
        nixl = load_nixl()
        config = nixl.nixl_agent_config(
            enable_prog_thread=False,
            backends=["UCX"],
            sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self.agent: Any = nixl.nixl_agent(name, config)
        self.peer = peer
        self.memory = "VRAM" if device.type == "cuda" else "DRAM"
        self.dev = (device.index or 0) if device.type == "cuda" else 0
        self.buf = torch.ones(nbytes, dtype=torch.uint8, device=device)
        self.agent.register_memory([(self.buf.data_ptr(), nbytes, self.dev, "")], self.memory)
        tmp = os.path.join(folder, f"{name}.tmp")
        Path(tmp).write_bytes(self.agent.get_agent_metadata() + b"@@" + str(self.buf.data_ptr()).encode())
        os.replace(tmp, os.path.join(folder, f"{name}.md"))
        path = os.path.join(folder, f"{peer}.md")
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise SystemExit(f"no {peer} agent")
            time.sleep(0.01)
        metadata, _, address = Path(path).read_bytes().rpartition(b"@@")
        self.agent.add_remote_agent(metadata)
        self.address = int(address.decode())

    def write(self, n: int, note: bytes) -> None:
        """WRITE the first ``n`` bytes to the peer's buffer with ``note``, waiting until it is done."""
        a = self.agent
        local = a.get_xfer_descs([(self.buf.data_ptr(), n, self.dev)], self.memory)
        remote = a.get_xfer_descs([(self.address, n, self.dev)], self.memory)
        handle = a.initialize_xfer("WRITE", local, remote, self.peer, note)
        state = a.transfer(handle)
        while state == "PROC":
            state = a.check_xfer_state(handle)
        if state != "DONE":
            raise SystemExit(f"WRITE failed: {state}")
        handle.release()

    def wait_note(self) -> bytes:
        """The peer's next notification, polled with the planes' poll threads' back-off."""
        backoff = Backoff(first_sleep_s=20e-6, park_s=1e-3)
        while True:
            got = self.agent.get_new_notifs().get(self.peer)
            if got:
                return bytes(got[0])
            backoff.idle([], [])


class BarePair:
    """This process's bare agent and its ``pong`` child; ``round_trip`` times one ping-pong."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self._folder = tempfile.TemporaryDirectory()
        argv = [__file__, "--pong", self._folder.name, "--bytes", str(nbytes), "--device", str(device)]
        self._child = subprocess.Popen([sys.executable, *argv])
        self._ping = _Agent("ping", "pong", nbytes, self._folder.name, device)

    def round_trip(self, size_out: int, size_back: int) -> float:
        """Seconds for ``size_out`` bytes there and ``size_back`` back, each a WRITE + notification."""
        start = time.perf_counter()
        self._ping.write(size_out, str(size_back).encode())
        self._ping.wait_note()
        return time.perf_counter() - start

    def close(self) -> None:
        try:
            self._ping.write(1, _STOP)
            self._child.wait(timeout=60)
        except (subprocess.TimeoutExpired, SystemExit):
            self._child.kill()
        finally:
            self._folder.cleanup()


def _pong(folder: str, nbytes: int, device: torch.device) -> None:
    agent = _Agent("pong", "ping", nbytes, folder, device)
    while (note := agent.wait_note()) != _STOP:
        agent.write(int(note.decode()), b"pong")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pong", required=True, help="the folder the two agents meet in")
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    _pong(args.pong, args.bytes, torch.device(args.device))


if __name__ == "__main__":
    main()
