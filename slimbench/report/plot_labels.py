"""Placing point labels on a Pareto plot: each where it overlaps no other label, marker or line.

Greedy: every label tries a list of spots around its point and takes the first that stays
inside the axes and overlaps nothing placed so far, no marker and no drawn line (the frontier);
a label without a free spot becomes a number, explained in the legend, put on a ring of growing
radius around its point.
"""

from __future__ import annotations

import math
from typing import Any

# Label positions tried in order: (dx, dy) in points, horizontal and vertical alignment.
CANDIDATES = [
    (6, 4, "left", "bottom"),
    (6, -4, "left", "top"),
    (-6, 4, "right", "bottom"),
    (-6, -4, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
    (10, 0, "left", "center"),
    (-10, 0, "right", "center"),
    (8, 16, "left", "bottom"),
    (8, -16, "left", "top"),
    (-8, 16, "right", "bottom"),
    (-8, -16, "right", "top"),
    (0, 24, "center", "bottom"),
    (0, -24, "center", "top"),
]
# A number (for the key) is small: try rings of growing radius around the point.
RING = [
    (round(r * math.cos(a * math.pi / 6)), round(r * math.sin(a * math.pi / 6)), "center", "center")
    for r in (9, 15, 22, 30, 40, 55, 70, 90)
    for a in range(12)
]


def crosses(bb: Any, segments: list[tuple[float, float, float, float]]) -> bool:
    """Whether any line segment (display pixels) passes through the box."""
    for x0, y0, x1, y1 in segments:
        steps = max(2, int(math.hypot(x1 - x0, y1 - y0) / 2))  # a sample every 2 pixels
        for k in range(steps + 1):
            t = k / steps
            if bb.contains(x0 + t * (x1 - x0), y0 + t * (y1 - y0)):
                return True
    return False


def place_labels(fig, ax, pts: list, segments: list[tuple[float, float, float, float]] = ()) -> tuple[list, list]:
    """Greedy placement: each label at the first candidate spot that overlaps no label, marker or line.

    Labels that find no free spot inside the axes become a number, explained in the legend.
    Returns the label boxes (display pixels) and the numbered key [(n, label)].
    """
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    centres = [ax.transData.transform((p.x, p.y)) for p in pts]
    occupied = [Bbox.from_bounds(cx - 6, cy - 6, 12, 12) for cx, cy in centres]
    placed: list[Any] = []
    key: list[tuple[int, str]] = []
    order = sorted(range(len(pts)), key=lambda i: (not pts[i].baseline, not pts[i].on_front, pts[i].label))
    for i in order:
        p = pts[i]
        bb = try_place(ax, renderer, p, p.label, axbox, occupied + placed, i, occupied, list(segments))
        if bb is None:
            n = len(key) + 1
            key.append((n, p.label))
            bb = try_place(ax, renderer, p, str(n), axbox, occupied + placed, i, occupied, list(segments), force=True)
            p.text = str(n)
        else:
            p.text = p.label
        placed.append(bb)
    return [tuple(b.bounds) for b in placed], key


def annotate(ax, p, text: str, dx: float, dy: float, ha: str, va: str, leader: bool):
    return ax.annotate(
        text,
        (p.x, p.y),
        xytext=(dx, dy),
        textcoords="offset points",
        fontsize=7,
        ha=ha,
        va=va,
        parse_math=False,
        zorder=5,
        color="0.45" if p.flag else "black",
        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 4} if leader else None,
    )


def try_place(ax, renderer, p, text: str, axbox, taken, i: int, markers, segments, force: bool = False):
    from matplotlib.text import Text

    first = None
    for dx, dy, ha, va in RING if force else CANDIDATES:
        far = abs(dx) + abs(dy) > 20  # a leader line says which point a distant label belongs to
        ann = annotate(ax, p, text, dx, dy, ha, va, far)
        ann.update_positions(renderer)
        bb = Text.get_window_extent(ann, renderer).expanded(1.04, 1.15)  # the text alone, not its leader line
        inside = axbox.contains(bb.x0, bb.y0) and axbox.contains(bb.x1, bb.y1)
        free = (
            inside
            and not any(bb.overlaps(o) for j, o in enumerate(taken) if not (j < len(markers) and j == i))
            and not crosses(bb, segments)
        )
        if free:
            if first is not None:
                first[0].remove()
            return bb
        if force and first is None and inside:
            first = (ann, bb)
            continue
        ann.remove()
    if force:
        if first is None:
            ann = annotate(ax, p, text, *CANDIDATES[0][:2], "left", "bottom", False)
            first = (ann, ann.get_window_extent(renderer))
        return first[1]
    return None
