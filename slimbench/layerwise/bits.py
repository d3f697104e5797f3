"""Bitwise equality of tensors and of argument trees: what the loop's memo may reuse."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers, so equality is bitwise (-0.0 != 0.0, NaN == NaN)."""
    if t.is_floating_point() or t.is_complex():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, with the same dtype, shape, strides and device."""
    if a is b:
        return True
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
            and torch.equal(bits(a), bits(b)))


def same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same_tensor(a, b)
    if a is b:
        return True
    return type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b


def tensors_in(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def same_args(a: dict[str, Any], b: dict[str, Any]) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and len(la) == len(lb) and all(same_leaf(x, y) for x, y in zip(la, lb, strict=True))
