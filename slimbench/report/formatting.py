"""Number formatting shared by every table."""

from __future__ import annotations

import math
from typing import Any


def fmt(v: Any) -> str:
    """Three significant digits for small numbers, fewer decimals for large ones, – for missing."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | float):
        v = float(v)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return "" if v is None else str(v)
