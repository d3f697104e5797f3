"""Pareto plots: quality against size, latency, throughput and memory, per model and hardware.

Reading aids: the baseline is a star with a dotted line at its quality; native points are
filled, simulated ones (masks, fake-quant in a dense model) hollow, and a timing that the
efficiency task flagged `noisy` gets a dotted ring. Simulated points are drawn on latency,
throughput and memory plots but never join those frontiers: they claim no speed-up. Labels
show each method's key settings, are placed where they overlap nothing, and fall back to a
numbered key where no free spot is left. Every label is plain text (no mathtext), so a `$`
in a model name is just a dollar sign. Files are named with a hash of what they show, so two
long model paths never share one image.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from slimbench.report import labels
from slimbench.report.formatting import fmt
from slimbench.report.table import SIZE_COLUMNS, EfficiencyColumn, Leaderboard, QualityColumn

DPI = 110
SIZE_AXIS = "stored size (MB, real bytes of the saved format)"


@dataclass(frozen=True)
class Axis:
    col: str
    words: str  # axis label with its unit (and regime)
    higher_better: bool
    speed: bool  # a latency, throughput or memory axis: simulated points stay off its frontier
    regime: str = ""  # the efficiency regime (its short label) of a speed axis


@dataclass
class Point:
    row: int  # index into the leaderboard's rows
    x: float
    y: float
    label: str
    simulated: bool
    noisy: bool
    baseline: bool
    on_front: bool = False
    px: float = 0.0  # pixel position in the saved image (for hover areas)
    py: float = 0.0
    text: str = ""  # what the label finally shows (the label, or its number in the key)


@dataclass
class Plot:
    path: Path
    title: str
    hardware: str
    model: str
    quality: str
    axis: Axis
    points: list[Point]
    width: int
    height: int
    log_y: bool
    label_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    key: list[tuple[int, str]] = field(default_factory=list)  # numbered labels that found no free spot


def axes_for(lb: Leaderboard, sec: pd.DataFrame) -> list[Axis]:
    """Size, then per regime: latency at batch 1 or throughput above it, TTFT at the longest prompt, memory.

    Only the regimes this section (one model on one hardware) has values for.
    """
    out = [Axis("stored MB", SIZE_AXIS, False, False)] if "stored MB" in SIZE_COLUMNS else []
    by = {(e.regime, e.metric): e for e in lb.efficiency if sec[e.col].notna().any()}

    def add(e: EfficiencyColumn | None, words: str) -> None:
        if e is not None:
            out.append(
                Axis(e.col, words, e.higher_better, True, labels.regime_label(e.regime) if e.regime else "efficiency")
            )

    regimes: list[Any] = [r for r in lb.regimes if any(k[0] == r for k in by)] or [None]
    longest = max(regimes, key=lambda r: (r[0], -r[2]) if r else (0, 0))
    for reg in regimes:
        where = f", {labels.regime_words(reg)}" if reg else ""
        batch = reg[2] if reg else 1
        if batch == 1:
            add(by.get((reg, "decode ms/token")), f"decode latency (ms per token{where})")
        else:
            add(by.get((reg, "decode_tokens_per_s")), f"decode throughput (tokens/s{where})")
        if reg == longest:
            first = by.get((reg, "ttft_ms"))
            add(
                first or by.get((reg, "prefill_ms")),
                ("time to first token (ms" if first else "prefill latency (ms") + where + ")",
            )
        add(by.get((reg, "peak_memory_mb")), f"peak memory during inference (MiB{where})")
    return out


def pareto_front(xs: list[float], ys: list[float], higher_y_better: bool, higher_x_better: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes."""
    sx = -1 if higher_x_better else 1
    sy = -1 if higher_y_better else 1
    order = sorted(range(len(xs)), key=lambda i: (sx * xs[i], sy * ys[i]))
    front, best = [], math.inf
    for i in order:
        if sy * ys[i] < best:
            front.append(i)
            best = sy * ys[i]
    return front


def slug(s: str, n: int) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")[:n] or "x"


def file_name(hw: str, model: str, qcol: str, axis: Axis) -> str:
    """Readable prefix plus a hash of everything the plot shows: unique even for long, similar names."""
    digest = hashlib.sha1(json.dumps([hw, model, qcol, axis.col]).encode()).hexdigest()[:10]
    return f"pareto_{slug(model, 40)}_{slug(qcol, 32)}_vs_{slug(axis.col, 24)}_{digest}.png"


def points(sec: pd.DataFrame, q: QualityColumn, axis: Axis) -> list[Point]:
    out = []
    for idx, r in sec.iterrows():
        x, y = r.get(axis.col), r.get(q.col)
        if pd.isna(x) or pd.isna(y):
            continue
        noisy = axis.speed and axis.regime in r["_noisy"]  # only the flagged regime's timings
        out.append(
            Point(
                int(idx),
                float(x),
                float(y),
                str(r["method"]),
                r["execution"] == "simulated",
                noisy,
                r["method_name"] == "baseline",
            )
        )
    return out


def write_plots(lb: Leaderboard, out: Path) -> list[Plot]:
    plots = []
    df = lb.df
    for (hw, model), sec in df.groupby(["hardware", "model"], sort=False):
        for q in lb.quality:
            for axis in axes_for(lb, sec):
                pts = points(sec, q, axis)
                if len(pts) < 2:
                    continue
                title = plot_title(str(model), q, axis, str(hw))
                plot = render(pts, q, axis, title, out / file_name(str(hw), str(model), q.col, axis))
                plot.hardware, plot.model = str(hw), str(model)
                plots.append(plot)
    return plots


def plot_title(model: str, q: QualityColumn, axis: Axis, hw: str) -> str:
    what = f"{model}: {q.col} vs {axis.words.split(' (')[0]}"
    return "\n".join(textwrap.wrap(what, 95) + textwrap.wrap(q.protocol, 95) + textwrap.wrap(hw, 95))


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


def render(pts: list[Point], q: QualityColumn, axis: Axis, title: str, path: Path) -> Plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    xs, ys = [p.x for p in pts], [p.y for p in pts]
    # Simulated points claim no speed-up: they may not define a latency or memory frontier.
    eligible = [i for i, p in enumerate(pts) if not (axis.speed and p.simulated)]
    front = [
        eligible[i]
        for i in pareto_front([xs[i] for i in eligible], [ys[i] for i in eligible], q.higher_better, axis.higher_better)
    ]
    for i in front:
        pts[i].on_front = True
    # A fixed layout (axes left, legend and key right): no layout engine to run, and pixel
    # positions computed before saving hold in the saved image.
    fig = plt.figure(figsize=(10.5, 5.8), dpi=DPI)
    ax = fig.add_axes((0.075, 0.1, 0.58, 0.76))
    for p in pts:
        draw_point(ax, p)
    if len(front) > 1:
        fx = sorted(front, key=lambda i: xs[i])
        ax.plot([xs[i] for i in fx], [ys[i] for i in fx], "--", color="C2", lw=1.2, zorder=2)
    base = next((p for p in pts if p.baseline), None)
    if base is not None:
        ax.axhline(base.y, color="0.45", lw=0.8, ls=":", zorder=1)
    log_y = not q.higher_better and min(ys) > 0 and max(ys) / min(ys) > 10
    if log_y:
        ax.set_yscale("log")
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel(
        axis.words + ("  (higher is better)" if axis.higher_better else "  (lower is better)"),
        parse_math=False,
        fontsize=9,
    )
    unit = f"{q.unit}, " if q.unit else ""
    better = "higher is better" if q.higher_better else "lower is better"
    ax.set_ylabel(f"{q.metric} ({unit}{better}{', log scale' if log_y else ''})", parse_math=False, fontsize=9)
    fig.suptitle(title, fontsize=8.5, x=0.365, y=0.985, va="top", parse_math=False)
    ax.grid(alpha=0.3)
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before reading positions
    boxes, key = place_labels(fig, ax, pts)
    handles = [
        Line2D([], [], ls="none", marker="*", ms=12, color="k", label="baseline (dotted: its quality)"),
        Line2D([], [], ls="none", marker="o", ms=7, color="C0", label="native"),
        Line2D(
            [],
            [],
            ls="none",
            marker="o",
            ms=7,
            mfc="none",
            mec="C3",
            mew=1.5,
            label="simulated (dense masks / fake-quant)" + ("\n  kept off this frontier" if axis.speed else ""),
        ),
        Line2D([], [], ls="--", color="C2", label="Pareto frontier"),
    ]
    if any(p.noisy for p in pts):
        handles.append(
            Line2D([], [], ls="none", marker="o", ms=12, mfc="none", mec="C1", mew=1.2, label="noisy timing")
        )
    for n, text in key:
        handles.append(Line2D([], [], ls="none", label=textwrap.shorten(f"{n}: {text}", 60, placeholder="…")))
    leg = fig.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(0.665, 0.86), frameon=False)
    for t in leg.get_texts():
        t.set_parse_math(False)
    width, height = fig.canvas.get_width_height()
    for p in pts:
        dx, dy = ax.transData.transform((p.x, p.y))
        p.px, p.py = float(dx), float(height - dy)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=DPI)  # no tight bbox: pixel positions must match the image
    plt.close(fig)
    tmp.replace(path)
    return Plot(path, title, "", "", q.col, axis, pts, width, height, log_y, boxes, key)


def draw_point(ax, p: Point) -> None:
    if p.baseline:
        ax.scatter(p.x, p.y, s=170, marker="*", color="k", zorder=4)
    elif p.simulated:
        ax.scatter(p.x, p.y, s=55, facecolors="none", edgecolors="C3", linewidths=1.5, zorder=3)
    else:
        ax.scatter(p.x, p.y, s=55, color="C0", zorder=3)
    if p.noisy:
        ax.scatter(p.x, p.y, s=190, facecolors="none", edgecolors="C1", linewidths=1.2, linestyles=":", zorder=3)


def place_labels(fig, ax, pts: list[Point]) -> tuple[list[tuple], list[tuple[int, str]]]:
    """Greedy placement: each label at the first candidate spot that overlaps no label or marker.

    Labels that find no free spot inside the axes become a number, explained in the legend.
    Returns the label boxes (display pixels) and the numbered key.
    """
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    centres = [ax.transData.transform((p.x, p.y)) for p in pts]
    occupied = [Bbox.from_bounds(cx - 6, cy - 6, 12, 12) for cx, cy in centres]
    placed: list[Bbox] = []
    key: list[tuple[int, str]] = []
    order = sorted(range(len(pts)), key=lambda i: (not pts[i].baseline, not pts[i].on_front, pts[i].label))
    for i in order:
        p = pts[i]
        bb = try_place(ax, renderer, p, p.label, axbox, occupied + placed, i, occupied)
        if bb is None:
            n = len(key) + 1
            key.append((n, p.label))
            bb = try_place(ax, renderer, p, str(n), axbox, occupied + placed, i, occupied, force=True)
            p.text = str(n)
        else:
            p.text = p.label
        placed.append(bb)
    return [tuple(b.bounds) for b in placed], key


def try_place(ax, renderer, p: Point, text: str, axbox, taken, i: int, markers, force: bool = False):
    from matplotlib.text import Text

    first = None
    for dx, dy, ha, va in RING if force else CANDIDATES:
        far = abs(dx) + abs(dy) > 20  # a leader line says which point a distant label belongs to
        ann = ax.annotate(
            text,
            (p.x, p.y),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=7,
            ha=ha,
            va=va,
            parse_math=False,
            zorder=5,
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 4} if far else None,
        )
        ann.update_positions(renderer)
        bb = Text.get_window_extent(ann, renderer).expanded(1.04, 1.15)  # the text alone, not its leader line
        inside = axbox.contains(bb.x0, bb.y0) and axbox.contains(bb.x1, bb.y1)
        free = inside and not any(bb.overlaps(o) for j, o in enumerate(taken) if not (j < len(markers) and j == i))
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
            ann = ax.annotate(
                text,
                (p.x, p.y),
                xytext=CANDIDATES[0][:2],
                textcoords="offset points",
                fontsize=7,
                ha="left",
                va="bottom",
                parse_math=False,
                zorder=5,
            )
            first = (ann, ann.get_window_extent(renderer))
        return first[1]
    return None


def tooltip(p: Point, plot: Plot, lb: Leaderboard) -> str:
    row = lb.df.loc[p.row]
    lines = [
        f"{row['method']} ({row['execution']}{', noisy timing' if p.noisy else ''})",
        str(row["model"]),
        f"{plot.quality}: {fmt(p.y)}",
        f"{plot.axis.words}: {fmt(p.x)}",
    ]
    if row["warnings"]:
        lines.append(f"warnings: {row['warnings']}")
    return "\n".join(lines)
