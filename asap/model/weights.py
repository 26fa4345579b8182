"""Where model parts get their tensors from: anything that returns a tensor by checkpoint name."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Protocol, Self

import torch

from asap.errors import CheckpointError


class TensorSource(Protocol):
    """Read-only access to checkpoint tensors by name (lazy: only what is asked for is read)."""

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored under ``name``; raises ``CheckpointError`` when it is absent."""
        ...


class ClosingSource:
    """Base of the file-backed sources: ``with source:`` calls ``close`` on the way out, so that the
    checkpoint reader and its random stand-in are used the same way."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release what the source holds; safe to call more than once."""


class DictTensorSource:
    """A ``TensorSource`` over tensors already in memory (tests, tools)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)
        self.names_read: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        try:
            tensor = self._tensors[name]
        except KeyError:
            raise CheckpointError(f"checkpoint has no tensor {name!r}") from None
        self.names_read.add(name)
        return tensor
