"""Switching the loop's shortcuts off, whichever method calls it (benchmarks, tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_VARIANT: ContextVar[dict[str, Any] | None] = ContextVar("slimbench_loop_variant", default=None)


def variant_settings() -> dict[str, Any]:
    return _VARIANT.get() or {}


@contextlib.contextmanager
def loop_variant(**settings: Any) -> Iterator[None]:
    """Run the loop differently inside the block, whichever method calls it (benchmarks, tests).

    ``reference=True``: :func:`sequential_reference`, no shared products and full Gram products,
    i.e. the loop as first written. ``memo``, ``early_stop``, ``share`` (SharedGram reuse),
    ``triangle`` (:func:`gram`'s half product): switch one shortcut off. ``stats``: a dict that
    :func:`sequential` fills with its counters.
    """
    allowed = {"reference", "memo", "early_stop", "share", "triangle", "stats"}
    if set(settings) - allowed:
        raise ValueError(f"unknown loop setting(s) {sorted(set(settings) - allowed)}; allowed: {sorted(allowed)}")
    token = _VARIANT.set({**variant_settings(), **settings})
    try:
        yield
    finally:
        _VARIANT.reset(token)


def shortcut_enabled(setting: str) -> bool:
    """A shortcut outside the loop itself (``share``, ``triangle``): off in the reference variant."""
    v = variant_settings()
    return v.get(setting, True) and not v.get("reference", False)
