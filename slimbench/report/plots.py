"""Pareto plots: quality against size, latency, throughput and memory, per model and hardware.

Reading aids: the baseline is a star with a dotted line at its quality; native points are
filled, simulated ones (masks, fake-quant in a dense model) hollow. A timing that is not a
result (``noisy``: taken while other processes used the cores; ``under-sampled``: fewer repeats
than its protocol asks) is drawn grey and dotted, its label grey, and never joins a frontier;
memory and size are not timings and are never flagged. Simulated points are drawn on latency,
throughput and memory plots but never join those frontiers: they claim no speed-up. A speed plot
with no trusted native timing besides the baseline is greyed whole, with a banner saying why,
instead of drawn as if it showed results. The legend lists only what is drawn, in a strip under
the axes; a log axis has plain tick labels (40, 100), never ``4 × 10¹``. Labels show each
method's key settings, avoid each other, the markers and the frontier line, and fall back to a
numbered key where no free spot is left. Every label is plain text (no mathtext), so a `$` in a
model name is just a dollar sign, and invisible characters are written out (``<U+202E>``). Files
are named with a hash of what they show, so two long model paths never share one image.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from slimbench.report import labels
from slimbench.report.escape import reveal
from slimbench.report.formatting import fmt
from slimbench.report.plot_labels import place_labels
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
    flag: str  # "noisy" / "under-sampled": this point's timing is not a result; "" otherwise
    baseline: bool
    on_front: bool = False
    px: float = 0.0  # pixel position in the saved image (for hover areas)
    py: float = 0.0
    text: str = ""  # what the label finally shows (the label, or its number in the key)

    @property
    def noisy(self) -> bool:
        """Whether this point's timing is flagged (noisy or under-sampled)."""
        return bool(self.flag)


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
    greyed: str = ""  # why the whole plot is grey (no trusted native timing to show), or ""
    legend: list[str] = field(default_factory=list)  # the legend's entries, as drawn
    yticks: list[str] = field(default_factory=list)  # the y tick labels, as drawn
    front_px: list[tuple[float, float, float, float]] = field(default_factory=list)  # frontier segments (display)


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
        flag = r["_flags"].get(axis.col, "")  # timed columns only: memory and size are never flagged
        out.append(
            Point(
                int(idx),
                float(x),
                float(y),
                reveal(r["method"]),
                r["execution"] == "simulated",
                flag,
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
                title = plot_title(reveal(model), q, axis, reveal(hw))
                plot = render(pts, q, axis, title, out / file_name(str(hw), str(model), q.col, axis))
                plot.hardware, plot.model = str(hw), str(model)
                plots.append(plot)
    return plots


def plot_title(model: str, q: QualityColumn, axis: Axis, hw: str) -> str:
    what = f"{model}: {q.col} vs {axis.words.split(' (')[0]}"
    return "\n".join(textwrap.wrap(what, 95) + textwrap.wrap(q.protocol, 95) + textwrap.wrap(hw, 95))


def greyed_reason(pts: list[Point], axis: Axis) -> str:
    """Why a speed plot shows nothing to read as a result, or '' (a size plot never is)."""
    if not axis.speed:
        return ""
    real = [p for p in pts if not p.baseline and not p.simulated and not p.flag]
    if real:
        return ""
    if all(p.flag for p in pts):
        return "Not a result: every timing here is noisy or under-sampled"
    if all(p.flag or p.simulated for p in pts if not p.baseline):
        return "Not a result: no method here has a trusted native timing (simulated points run the dense model)"
    return ""


# Figure layout in inches: width fits two plots side by side in a 1,364-pixel-wide page at DPI.
WIDTH, TOP, AXES_H, BOTTOM, LEFT, RIGHT, LEGEND_ROW = 5.8, 0.55, 3.0, 0.6, 0.72, 0.18, 0.165


def render(pts: list[Point], q: QualityColumn, axis: Axis, title: str, path: Path) -> Plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = [p.x for p in pts], [p.y for p in pts]
    greyed = greyed_reason(pts, axis)
    # Simulated points claim no speed-up, and an untrusted timing is no result: neither may
    # define a latency or memory frontier. A greyed plot draws no frontier at all.
    eligible = [i for i, p in enumerate(pts) if not p.flag and not (axis.speed and p.simulated)] if not greyed else []
    front = [
        eligible[i]
        for i in pareto_front([xs[i] for i in eligible], [ys[i] for i in eligible], q.higher_better, axis.higher_better)
    ]
    for i in front:
        pts[i].on_front = True
    # A fixed layout (axes on top, a legend strip under them): no layout engine to run, and pixel
    # positions computed before saving hold in the saved image.
    fig = plt.figure(figsize=(WIDTH, TOP + AXES_H + BOTTOM), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    place_axes(fig, ax, 0)
    for p in pts:
        draw_point(ax, p, greyed)
    segments = []
    if len(front) > 1:
        fx = sorted(front, key=lambda i: xs[i])
        ax.plot([xs[i] for i in fx], [ys[i] for i in fx], "--", color="C2", lw=1.2, zorder=2)
    base = next((p for p in pts if p.baseline), None)
    if base is not None:
        ax.axhline(base.y, color="0.45", lw=0.8, ls=":", zorder=1)
    log_y = not q.higher_better and min(ys) > 0 and max(ys) / min(ys) > 10
    if log_y:
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    ax.margins(x=0.15, y=0.12)
    xlabel = axis.words + ("  (higher is better)" if axis.higher_better else "  (lower is better)")
    ax.set_xlabel("\n".join(textwrap.wrap(xlabel, 88)), parse_math=False, fontsize=7.5)
    unit = f"{q.unit}, " if q.unit else ""
    better = "higher is better" if q.higher_better else "lower is better"
    ax.set_ylabel(f"{q.metric} ({unit}{better}{', log scale' if log_y else ''})", parse_math=False, fontsize=7.5)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(alpha=0.3)
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before reading positions
    if len(front) > 1:
        segments = front_segments(ax, [(xs[i], ys[i]) for i in sorted(front, key=lambda i: xs[i])])
    boxes, key = place_labels(fig, ax, pts, segments)
    handles = legend_handles(pts, axis, len(front) > 1, greyed)
    handles += [key_handle(n, text) for n, text in key]
    ncol = 2
    rows = math.ceil(len(handles) / ncol)
    place_axes(fig, ax, rows)
    fig.suptitle(title, fontsize=7.5, x=0.5, y=1 - 0.06 / fig.get_figheight(), va="top", parse_math=False)
    if handles:
        leg = fig.legend(
            handles=handles,
            fontsize=6.5,
            ncol=ncol,
            loc="upper left",
            bbox_to_anchor=(LEFT / WIDTH, (rows * LEGEND_ROW + 0.06) / fig.get_figheight()),
            frameon=False,
            handletextpad=0.4,
            columnspacing=1.2,
            borderaxespad=0,
        )
        for t in leg.get_texts():
            t.set_parse_math(False)
    if greyed:
        ax.text(
            0.5,
            0.5,
            greyed,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            color="0.25",
            wrap=True,
            bbox={"boxstyle": "round", "fc": "#f2f2f2", "ec": "0.6"},
            zorder=6,
            parse_math=False,
        )
        ax.set_facecolor("#f4f4f4")
    width, height = fig.canvas.get_width_height()
    for p in pts:
        dx, dy = ax.transData.transform((p.x, p.y))
        p.px, p.py = float(dx), float(height - dy)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=DPI)  # no tight bbox: pixel positions must match the image (and tick labels are set)
    ticks = [t.get_text() for t in ax.yaxis.get_ticklabels(which="both") if t.get_text()]
    plt.close(fig)
    tmp.replace(path)
    legend = [h.get_label() for h in handles]
    return Plot(
        path, title, "", "", q.col, axis, pts, width, height, log_y, boxes, key, greyed, legend, ticks, segments
    )


def place_axes(fig, ax, legend_rows: int) -> None:
    """Size the figure for ``legend_rows`` rows of legend and keep the axes the same size in inches."""
    legend_h = legend_rows * LEGEND_ROW + (0.1 if legend_rows else 0)
    height = TOP + AXES_H + BOTTOM + legend_h
    fig.set_size_inches(WIDTH, height)
    ax.set_position((LEFT / WIDTH, (BOTTOM + legend_h) / height, (WIDTH - LEFT - RIGHT) / WIDTH, AXES_H / height))


def front_segments(ax, xy: list[tuple[float, float]]) -> list[tuple[float, float, float, float]]:
    pix = [tuple(ax.transData.transform(p)) for p in xy]
    return [(*a, *b) for a, b in itertools.pairwise(pix)]


def plain_log_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (40, 100, 1,000), never 4 × 10¹; minor ticks
    labelled only where a decade or less is shown (else they would crowd)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def plain(v: float, _pos: Any = None) -> str:
        if v <= 0:
            return ""
        if v >= 1e6 or v < 1e-3:
            return f"{v:.0e}"
        return f"{v:,.0f}" if v >= 1 and v == round(v) else f"{v:g}"

    lo, hi = axis.get_view_interval()
    axis.set_major_formatter(FuncFormatter(plain))
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 99
    axis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5) if decades <= 1.5 else (2, 5)))
    axis.set_minor_formatter(FuncFormatter(plain if decades <= 2.5 else (lambda v, _pos=None: "")))


def legend_handles(pts: list[Point], axis: Axis, frontier: bool, greyed: str) -> list:
    """One entry per kind of mark actually drawn, nothing else."""
    from matplotlib.lines import Line2D

    ink = "0.6" if greyed else None
    out = []
    if any(p.baseline for p in pts):
        out.append(
            Line2D([], [], ls="none", marker="*", ms=10, color=ink or "k", label="baseline (dotted: its quality)")
        )
    if any(not p.baseline and not p.simulated and not p.flag for p in pts):
        out.append(Line2D([], [], ls="none", marker="o", ms=6, color=ink or "C0", label="native"))
    if any(not p.baseline and p.simulated and not p.flag for p in pts):
        words = "simulated (masks, fake-quant)" + (": off the frontier" if axis.speed else "")
        out.append(Line2D([], [], ls="none", marker="o", ms=6, mfc="none", mec=ink or "C3", mew=1.4, label=words))
    if frontier:
        out.append(Line2D([], [], ls="--", color="C2", label="Pareto frontier"))
    flags = sorted({p.flag for p in pts if p.flag})
    if flags:
        out.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="o",
                ms=6,
                mfc="none",
                mec="0.55",
                mew=1.2,
                label=f"{' / '.join(flags)} timing: not a result",
            )
        )
    return out


def key_handle(n: int, text: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="none", label=textwrap.shorten(f"{n}: {text}", 48, placeholder="…"))


def draw_point(ax, p: Point, greyed: str = "") -> None:
    if p.flag or greyed:  # not a result: grey, hollow, dotted
        marker, size = ("*", 150) if p.baseline else ("o", 50)
        ax.scatter(
            p.x,
            p.y,
            s=size,
            marker=marker,
            facecolors="none",
            edgecolors="0.55",
            linewidths=1.2,
            linestyles=":" if p.flag else "-",
            zorder=3,
        )
    elif p.baseline:
        ax.scatter(p.x, p.y, s=150, marker="*", color="k", zorder=4)
    elif p.simulated:
        ax.scatter(p.x, p.y, s=50, facecolors="none", edgecolors="C3", linewidths=1.4, zorder=3)
    else:
        ax.scatter(p.x, p.y, s=50, color="C0", zorder=3)


def tooltip(p: Point, plot: Plot, lb: Leaderboard) -> str:
    row = lb.df.loc[p.row]
    lines = [
        f"{row['method']} ({row['execution']}{f', {p.flag} timing: not a result' if p.flag else ''})",
        str(row["model"]),
        f"{plot.quality}: {fmt(p.y)}",
        f"{plot.axis.words}: {fmt(p.x)}",
    ]
    if row["warnings"]:
        lines.append(f"warnings: {row['warnings']}")
    return "\n".join(lines)
