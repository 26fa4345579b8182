"""The four ASAP optimizations and the ``--optimizations`` value that switches them.

``all`` (the default) turns every optimization on, ``none`` turns every one off, and a comma list names
the ones to keep on. Parsing happens once at the entry point; services take the resulting frozenset.
"""

from __future__ import annotations

from collections.abc import Set

from asap.errors import InvalidArgument

OPTIMIZATIONS: tuple[str, ...] = ("min-batch", "dual-batch", "expert-overlap", "layer-agnostic")
"""Every optimization name, in the order of docs/architecture.md §1."""

ALL = "all"
NONE = "none"


def parse_optimizations(text: str = ALL) -> frozenset[str]:
    """``"all"`` -> every name, ``"none"`` -> the empty set, ``"a,b"`` -> those names.

    Case and surrounding spaces are ignored; empty items (``"a,,b"``, a trailing comma) are skipped.
    ``all``/``none`` must stand alone. Unknown names raise ``InvalidArgument`` naming them and the valid ones.
    """
    items = [item.strip().lower() for item in text.split(",")]
    items = [item for item in items if item]
    if items == [ALL]:
        return frozenset(OPTIMIZATIONS)
    if items == [NONE]:
        return frozenset()
    if not items:
        raise InvalidArgument(
            f"empty --optimizations value; expected {ALL!r}, {NONE!r} or a comma list of "
            f"{', '.join(OPTIMIZATIONS)}"
        )
    unknown = sorted({item for item in items if item not in OPTIMIZATIONS})
    if unknown:
        hint = f" ({ALL!r} and {NONE!r} must stand alone)" if {ALL, NONE} & set(unknown) else ""
        raise InvalidArgument(
            f"unknown optimization(s) {', '.join(unknown)}{hint}; valid: {', '.join(OPTIMIZATIONS)}, "
            f"or {ALL!r} / {NONE!r}"
        )
    return frozenset(items)


def format_optimizations(enabled: Set[str]) -> str:
    """The canonical text of a set: ``"all"``, ``"none"`` or the names sorted and comma-joined.

    ``parse_optimizations(format_optimizations(s)) == s`` for every valid set; unknown names raise
    ``InvalidArgument``.
    """
    unknown = sorted(set(enabled) - set(OPTIMIZATIONS))
    if unknown:
        raise InvalidArgument(
            f"unknown optimization(s) {', '.join(unknown)}; valid: {', '.join(OPTIMIZATIONS)}"
        )
    if len(enabled) == len(OPTIMIZATIONS):
        return ALL
    if not enabled:
        return NONE
    return ",".join(sorted(enabled))
