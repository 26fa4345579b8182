"""What both ends of a NIXL link share: loading NIXL, the link end (an agent, its registered slot memory,
the peer it writes to) and the poll thread that takes notifications (DESIGN.md §10).

NIXL (``nixl-cu13`` on PyPI, UCX inside) gives registered memory, one-sided WRITEs and notifications
delivered after the written data, over NVLink, InfiniBand/RoCE, TCP or shared memory: the fast plane's
slot/descriptor protocol (``asap.dataplane.fastlink``) maps onto it without a second definition. Each end
registers K slots of the fast link's layout (slot header, rows, ids, weights), the WRITEs' destinations;
a dispatch is one WRITE into the same slot of the expert end, with the packed ``Request`` as the
notification; the answer is one WRITE of the results (over the rows) back, with the packed ``Completion``.
A WRITE reads from the slot or, for host rows, from the memory they already live in (``register``ed for
that WRITE and deregistered once it is over: no copy into the slot first).
The agents' metadata travel once per stream on the link's authenticated gRPC stream (``NixlLink``).

NIXL is optional (``pip install asap-serve[nixl]``): ``nixl_missing()`` says why it cannot be used here,
and nothing imports it until a link needs it. One agent per link end, so notifications name their link.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import secrets
import threading
import time
from types import ModuleType
from typing import Any, Protocol

import torch

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.nixl_pool import RegisteredBuffers
from asap.dataplane.poller import OnePerProcess, Polled, Sweeper
from asap.dataplane.ring import Backoff
from asap.errors import InvalidArgument, Unavailable
from asap.v1 import expert_pb2

__all__ = [
    "BEAT_NS",
    "HANDSHAKE_MICRO_BATCH",
    "HEARTBEAT",
    "NixlEnd",
    "NixlPoller",
    "load_nixl",
    "nixl_installed",
    "nixl_missing",
    "nixl_poller",
]

logger = logging.getLogger(__name__)

HANDSHAKE_MICRO_BATCH = 2**64 - 1
"""The micro-batch of the stream chunk that announces a NIXL link (never a real one)."""
HEARTBEAT = b"H"
"""The notification an expert end sends every ``BEAT_NS``: a frozen peer is noticed by its absence."""
BEAT_NS = 500_000_000
_MAX_METADATA = 1 << 20
_AGENT = re.compile(r"^asap-[A-Za-z0-9_.-]{1,120}$")
_MODULES = ("nixl_cu13", "nixl_cu12", "nixl")
_loaded: ModuleType | None = None
_missing: str | None = None
_load_lock = threading.Lock()


def nixl_installed() -> bool:
    """Whether a NIXL package is installed, without importing it (seconds on a loaded host: it loads UCX
    and its plugins); ``nixl_missing`` says whether it also imports."""
    return any(importlib.util.find_spec(name) is not None for name in _MODULES)


def nixl_missing() -> str:
    """Why NIXL cannot be used in this process ("" when it can): the import error, once."""
    global _loaded, _missing
    with _load_lock:
        if _missing is None:
            errors = []
            for name in _MODULES:
                try:
                    module = importlib.import_module(name)
                    module.nixl_agent  # noqa: B018  (the meta package raises here without a backend)
                except Exception as exc:  # ImportError, OSError (a library missing), AttributeError
                    errors.append(f"{name}: {exc}")
                    continue
                _loaded, _missing = module, ""
                break
            else:
                _missing = "NIXL is not installed (pip install asap-serve[nixl]): " + "; ".join(errors)
        return _missing


def load_nixl() -> ModuleType:
    """The NIXL module, or ``Unavailable`` naming why not."""
    missing = nixl_missing()
    if missing:
        raise Unavailable(missing)
    assert _loaded is not None
    return _loaded


def _memory_of(device: torch.device) -> str:
    return "VRAM" if device.type == "cuda" else "DRAM"


class NixlEnd:
    """One end of a NIXL link: an agent, K registered slots of ``geometry`` on ``device``, and (once
    ``connect``ed) the peer end it writes to. Thread-safe: the agent runs in strict sync mode, since the
    event loop or compute thread posts WRITEs while the poll thread takes notifications."""

    def __init__(self, role: str, geometry: LinkGeometry, device: torch.device) -> None:
        nixl = load_nixl()
        self.geometry = geometry
        self.device = device
        self.memory = _memory_of(device)
        self.name = f"asap-{role}-{os.getpid()}-{secrets.token_hex(4)}"
        # No progress thread: NIXL's spins (~0.3 of a core per idle agent measured on a loaded 2-core
        # host); the poll thread's calls (notifications, transfer states) make progress instead.
        config = nixl.nixl_agent_config(
            enable_prog_thread=False,
            backends=["UCX"],
            sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        try:
            self.agent: Any = nixl.nixl_agent(self.name, config)
        except Exception as exc:
            raise Unavailable(f"cannot start a NIXL agent with UCX: {exc}") from None
        self.slots = torch.empty(geometry.slots * geometry.slot_bytes, dtype=torch.uint8, device=device)
        self.address = int(self.slots.data_ptr())
        self.device_id = (device.index or 0) if device.type == "cuda" else 0
        try:
            self._registered = self.agent.register_memory(
                [(self.address, self.slots.numel(), self.device_id, "")], self.memory
            )
        except Exception as exc:
            raise Unavailable(f"NIXL cannot register {self.memory} slot memory: {exc}") from None
        self.buf: memoryview | None = None
        if device.type == "cpu":
            self.buf = memoryview(self.slots.numpy())  # type: ignore[arg-type]
        """Host slots as bytes (the fast link's ``SlotHeader`` and ids are read and written through it)."""
        self.peer: str | None = None
        self._peer_address = 0
        self._peer_device = 0
        self._peer_memory = "DRAM"
        self._posted: list[tuple[Any, Any, object]] = []
        """WRITEs in progress: (handle, registration to drop after it, what owns the memory it reads)."""
        self._lock = threading.Lock()
        self.closed = False
        self.bytes_written = 0
        self.buffers = RegisteredBuffers(geometry.slot_bytes, device, self.register, self._deregister)
        """A registered buffer per slot that answers are computed into and WRITTEN from (``nixl_pool``)."""

    def announcement(self) -> expert_pb2.NixlLink:
        g = self.geometry
        return expert_pb2.NixlLink(
            agent=self.name,
            metadata=self.agent.get_agent_metadata(),
            slots_address=self.address,
            device_id=self.device_id,
            memory=self.memory,
            slots=g.slots,
            slot_bytes=g.slot_bytes,
            hidden_size=g.hidden_size,
            top_k=g.top_k,
            itemsize=g.itemsize,
        )

    def connect(self, link: expert_pb2.NixlLink) -> None:
        """Load the peer's metadata; ``InvalidArgument`` if the announcement is not a usable peer of this
        end (bad name, metadata, geometry or memory), never a crash."""
        g = self.geometry
        peer = (link.slots, link.slot_bytes, link.hidden_size, link.top_k, link.itemsize)
        if peer != (g.slots, g.slot_bytes, g.hidden_size, g.top_k, g.itemsize):
            raise InvalidArgument(f"NIXL link geometry {peer} does not match this end's {g}")
        if not _AGENT.match(link.agent):
            raise InvalidArgument(f"NIXL agent name {link.agent[:80]!r} is not asap-[A-Za-z0-9_.-]+")
        if not 0 < len(link.metadata) <= _MAX_METADATA:
            raise InvalidArgument(f"NIXL agent metadata of {len(link.metadata)} bytes")
        if link.memory not in ("DRAM", "VRAM") or not link.slots_address:
            raise InvalidArgument(f"NIXL link memory {link.memory!r} at {link.slots_address:#x}")
        try:
            name = self.agent.add_remote_agent(link.metadata)
        except Exception as exc:
            raise InvalidArgument(f"bad NIXL agent metadata: {exc}") from None
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name != link.agent:
            raise InvalidArgument(f"NIXL metadata is of agent {name!r}, announced as {link.agent!r}")
        self.peer = name
        self._peer_address = link.slots_address
        self._peer_device = link.device_id
        self._peer_memory = link.memory

    def slot(self, slot: int) -> torch.Tensor:
        """The bytes of ``slot`` (a view of the registered memory)."""
        g = self.geometry
        return self.slots[slot * g.slot_bytes : (slot + 1) * g.slot_bytes]

    def slot_address(self, slot: int) -> int:
        """Where ``slot`` starts in this end's registered memory."""
        return self.address + slot * self.geometry.slot_bytes

    def write(self, slot: int, start: int, end: int, notification: bytes) -> None:
        """Post a WRITE of bytes ``start..end`` of ``slot`` into the same bytes of the peer's slot, with
        ``notification`` delivered after them. ``Unavailable`` if NIXL refuses it."""
        at = slot * self.geometry.slot_bytes
        self.post(slot, [(self.address + at + start, end - start, start)], notification)

    def register(self, tensor: torch.Tensor) -> Any:
        """Register the memory ``tensor`` already lives in (host memory: ~30-70 µs for 1-32 MB measured
        here, against a copy of its bytes into a slot), so a WRITE can read it where it is; the
        registration goes with the WRITE that ``post`` is given it for."""
        try:
            return self.agent.register_memory(
                [(int(tensor.data_ptr()), tensor.numel() * tensor.element_size(), self.device_id, "")],
                self.memory,
            )
        except Exception as exc:
            raise Unavailable(f"NIXL cannot register {self.memory} memory: {exc}") from None

    def post(
        self,
        slot: int,
        pieces: list[tuple[int, int, int]],
        notification: bytes,
        *,
        registered: Any = None,
        hold: object = None,
    ) -> None:
        """One WRITE of ``pieces`` (local address, bytes, offset in the peer's ``slot``) with
        ``notification`` delivered after all of them. ``registered`` (a ``register``ed memory the pieces
        read from) is deregistered, and ``hold`` (what owns that memory) let go, once the WRITE is over.
        ``Unavailable`` if NIXL refuses it (``registered`` is then deregistered at once)."""
        if self.peer is None or self.closed:
            self._deregister(registered)
            raise Unavailable("NIXL link is not connected")
        peer_at = self._peer_address + slot * self.geometry.slot_bytes
        try:
            local = self.agent.get_xfer_descs([(a, n, self.device_id) for a, n, _ in pieces], self.memory)
            remote = self.agent.get_xfer_descs(
                [(peer_at + o, n, self._peer_device) for _, n, o in pieces], self._peer_memory
            )
            handle = self.agent.initialize_xfer("WRITE", local, remote, self.peer, notification)
            state = self.agent.transfer(handle)
        except Exception as exc:
            self._deregister(registered)
            raise Unavailable(f"NIXL WRITE to {self.peer} failed: {exc}") from None
        if state == "ERR":
            handle.release()
            self._deregister(registered)
            raise Unavailable(f"NIXL WRITE to {self.peer} failed")
        self.bytes_written += sum(n for _, n, _ in pieces)
        if state == "DONE":  # over within the call (host memory over ``cma``: the copy is the call)
            handle.release()  # nothing for the poll thread to move on or reap: no naps while "writing"
            self._deregister(registered)
            return
        with self._lock:
            self._posted.append((handle, registered, hold))

    def _deregister(self, registered: Any) -> None:
        if registered is not None:
            try:
                self.agent.deregister_memory(registered)
            except Exception:
                logger.debug("NIXL deregistration failed", exc_info=True)

    @property
    def writing(self) -> bool:
        """Whether WRITEs of this end are still in progress (the poll thread then keeps polling closely:
        its calls are what moves them on)."""
        return bool(self._posted)

    def reap(self) -> str:
        """Release finished WRITEs (the poll thread); the error text of a failed one, else ""."""
        with self._lock:
            posted, self._posted = self._posted, []
        keep, error = [], ""
        for entry in posted:
            handle, registered, _ = entry
            state = self.agent.check_xfer_state(handle)
            if state == "PROC":
                keep.append(entry)
                continue
            if state == "ERR":
                error = f"NIXL WRITE to {self.peer} failed"
            handle.release()
            self._deregister(registered)
        if keep:
            with self._lock:
                self._posted = keep + self._posted
        return error

    def beat(self) -> None:
        """A heartbeat notification to the peer (the expert side sends one every ``BEAT_NS``)."""
        if self.peer is not None and not self.closed:
            try:
                self.agent.send_notif(self.peer, HEARTBEAT)
            except Exception:  # the peer is gone: its side notices by the missing beats
                logger.debug("NIXL heartbeat to %s failed", self.peer, exc_info=True)

    def notifications(self) -> list[bytes]:
        """Notifications that arrived from the peer (each after the data of its WRITE)."""
        if self.closed:
            return []
        got: dict[str, list[bytes]] = self.agent.get_new_notifs()
        if self.peer is None:
            return []
        return got.get(self.peer, [])

    def close(self) -> None:
        """Forget the peer and release the memory and agent (idempotent; the poll thread left it)."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            posted, self._posted = self._posted, []
        for handle, registered, _ in posted:
            try:
                handle.release()
            except Exception:  # a WRITE still in progress to a dead peer: the agent's teardown frees it
                logger.debug("NIXL handle release failed", exc_info=True)
            self._deregister(registered)
        self.buffers.close()
        try:
            if self.peer is not None:
                self.agent.remove_remote_agent(self.peer)
            self.agent.deregister_memory(self._registered)
        except Exception:
            logger.debug("NIXL teardown of %s failed", self.name, exc_info=True)
        self.buf = None


WRITE_NAP_S = 50e-6
"""How long a poll thread sleeps between its looks at WRITEs still in progress (its calls are what moves
them on). Not a spin: on a loaded host a spinning poll thread takes the core the peer process, or this
process's sender, needs to finish the very transfer it waits for."""


class NixlPolled(Polled, Protocol):
    """A NIXL link end the poll thread serves: ``poll`` says whether notifications came, ``writing``
    whether WRITEs of the end are still in progress."""

    @property
    def writing(self) -> bool: ...


class NixlPoller(Sweeper[NixlPolled]):
    """One daemon thread per process side taking the notifications of every NIXL link end it holds
    (there is no doorbell to park on: it sleeps with back-off when nothing came, and naps
    ``WRITE_NAP_S`` between looks while WRITEs are in progress)."""

    link = "NIXL"

    def _run(self) -> None:
        backoff = Backoff(first_sleep_s=20e-6, park_s=1e-3)
        while not self._stopped:
            endpoints = self._endpoints
            worked = self._poll(endpoints, time.monotonic_ns())
            self._count_sweep()
            if worked:
                backoff.reset()
            elif any(end.writing for end in endpoints):
                backoff.reset()
                time.sleep(WRITE_NAP_S)
            else:
                backoff.idle([], [])


_POLLER = OnePerProcess(lambda: NixlPoller("nixl-completions"))


def nixl_poller() -> NixlPoller:
    """The attention process's one poll thread for the completions of all its NIXL links."""
    return _POLLER.get()
