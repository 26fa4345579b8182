"""``asap.model.meta.meta_empty``: one shared meta tensor per shape and dtype."""

from __future__ import annotations

import pytest
import torch

from asap.model import meta
from asap.model.meta import meta_empty


def test_one_tensor_per_shape_and_dtype() -> None:
    a = meta_empty((3, 5), torch.bfloat16)
    assert a.device.type == "meta" and a.shape == (3, 5) and a.dtype is torch.bfloat16
    assert meta_empty((3, 5), torch.bfloat16) is a
    assert meta_empty((3, 5), torch.float32) is not a
    assert meta_empty((4, 5), torch.bfloat16).shape == (4, 5)


def test_past_the_bound_new_shapes_are_made_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meta, "_made", {})
    monkeypatch.setattr(meta, "_MAX_SHAPES", 1)
    kept = meta_empty((1, 2), torch.float32)
    assert meta_empty((1, 2), torch.float32) is kept
    fresh = meta_empty((2, 2), torch.float32)
    assert fresh.shape == (2, 2) and meta_empty((2, 2), torch.float32) is not fresh
