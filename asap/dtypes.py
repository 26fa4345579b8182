"""The model dtypes a rank can run in, by the name the CLI, the cluster spec and the configs use.

The names are torch's attribute names. torch is imported only where a ``torch.dtype`` is built, so config
modules and the cluster spec can check a name without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asap.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
"""Model dtype names, in ``--dtype`` order (the first is the default)."""


def check_dtype_name(name: str) -> None:
    """Raise ``InvalidArgument`` unless ``name`` is one of ``DTYPES``."""
    if name not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` of a model dtype name; ``InvalidArgument`` for any other name."""
    import torch

    check_dtype_name(name)
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of a model dtype; ``InvalidArgument`` for a dtype not in ``DTYPES``."""
    import torch

    supported = [getattr(torch, name) for name in DTYPES]
    if dtype not in supported:
        raise InvalidArgument(f"unsupported model dtype {dtype}; expected one of {supported}")
    return int(dtype.itemsize)
