"""Words of shared memory that one process stores while another loads them (ring indices and flags,
heartbeats): each loaded and stored whole, by one aligned machine load or store.

Why not ``struct``: ``Struct.pack_into`` first zeroes the bytes it packs (a ``memset``), then writes a
little-endian integer one byte at a time, and ``unpack_from`` reads it byte by byte. A reader in another
process (no GIL in common) therefore sees 0, or a mix of old and new bytes, while the word is rewritten:
10% of the loads of a word that another process rewrote in a loop came back torn (CPython 3.11, this
2-core host). A heartbeat word read as 0 looked like an expert that never attached (and failed a link
that had served traffic once it was older than the attach bound); a torn ring tail took credits away.
A memoryview cast to the native ``Q`` / ``I`` format copies its item with one fixed-size ``memcpy``,
which compiles to one 8- or 4-byte move: atomic when aligned, on x86-64 and AArch64 alike. The words
are in the host's byte order (every word here is in memory that both processes share on one host).

Each access casts a fresh one-item view and drops it at once (as ``struct`` held the buffer only for
its call): a view kept would pin the mapping, which then could not be closed while, say, a ring over
it is still referenced. After the mapping is let go (the buffer replaced by an empty one) a load
raises ``IndexError`` and a store ``TypeError`` (where ``struct`` raised ``struct.error``: the callers
that may race a retirement catch all of them); an unaligned offset raises ``ValueError``.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["load_u32", "load_u64", "store_u32", "store_u64"]


def _word(buf: memoryview, at: int, size: int, fmt: Literal["Q", "I"]) -> memoryview:
    if at % size:
        raise ValueError(f"a {size}-byte word at unaligned offset {at}")
    return buf[at : at + size].cast(fmt)


def store_u64(buf: memoryview, at: int, value: int) -> None:
    """Store the u64 word at ``at`` (8-aligned) in one move."""
    _word(buf, at, 8, "Q")[0] = value


def load_u64(buf: memoryview, at: int) -> int:
    """Load the u64 word at ``at`` (8-aligned) in one move."""
    value: int = _word(buf, at, 8, "Q")[0]
    return value


def store_u32(buf: memoryview, at: int, value: int) -> None:
    """Store the u32 word at ``at`` (4-aligned) in one move."""
    _word(buf, at, 4, "I")[0] = value


def load_u32(buf: memoryview, at: int) -> int:
    """Load the u32 word at ``at`` (4-aligned) in one move."""
    value: int = _word(buf, at, 4, "I")[0]
    return value
