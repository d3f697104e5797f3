"""Latency against throughput under load: one figure per model and hardware, a curve per method and server.

Each ``serving`` record holds its load points (synchronous, concurrency levels, rates, the
throughput run). A curve joins them in order of the load offered (synchronous, then concurrency or rate, the
throughput run last; at saturation it bends back when throughput falls); its y values are
the percentile the record's SLO is stated at (p90 by default): time to first token on the left
panel, inter-token latency on the right. The SLO bound is a dashed line on each; a load point
that met the whole SLO is a filled marker, one that missed it hollow. Simulated methods (zeros
or fake-quant in a dense model) are drawn dotted: their server runs the dense arithmetic.
Every label is plain text (no mathtext).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimbench.report import labels
from slimbench.report.serving import is_serving, server_name

DPI = 110
PANELS = (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"))


@dataclass
class ServingPlot:
    path: Path
    title: str
    hardware: str
    model: str
    curves: int


def offered(p: dict[str, Any]) -> float:
    """The load a point offered, for drawing in order: synchronous, then streams or rates, throughput last."""
    kind = p.get("strategy")
    if kind == "synchronous":
        return 0.0
    if kind == "throughput" or not isinstance(p.get("target"), int | float):
        return math.inf
    return float(p["target"])


def curve(rec: dict[str, Any]) -> dict[str, Any]:
    """x (req/s), y per panel (ms at the SLO's percentile), met flags, for one record."""
    d = rec.get("task_details") or {}
    q = f"p{float((d.get('slo') or {}).get('percentile', 90.0)):g}"
    pts = sorted(d.get("load_points") or [], key=offered)
    out: dict[str, Any] = {"x": [float(p.get("request_throughput", math.nan)) for p in pts],
                           "met": [bool((p.get("slo") or {}).get("met")) for p in pts], "q": q}
    for key, _ in PANELS:
        ys = []
        for p in pts:
            obj = ((p.get("slo") or {}).get("objectives") or {}).get(key) or {}
            v = obj.get(q) if q in obj else None
            if v is None:  # not an objective of this SLO: the load point's own percentile (p90 kept)
                v = ((p.get("latency") or {}).get(key) or {}).get("p90")
            ys.append(float(v) if isinstance(v, int | float) else math.nan)
        out[key] = ys
    return out


def bounds(recs: list[dict[str, Any]], key: str) -> list[tuple[float, str]]:
    seen = {}
    for r in recs:
        slo = (r.get("task_details") or {}).get("slo") or {}
        if slo.get(key) is not None:
            seen[float(slo[key])] = f"SLO p{float(slo.get('percentile', 90)):g} ≤ {float(slo[key]):g} ms"
    return sorted(seen.items())


def render(recs: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(recs) > len(colours):  # a colour of its own for each curve: the default cycle repeats after ten
        colours = [plt.get_cmap("tab20")(k) for k in range(20)]
    for i, r in enumerate(sorted(recs, key=lambda x: (labels.method_label(x), server_name(x)))):
        c = curve(r)
        simulated = (r.get("method_report") or {}).get("execution") == "simulated"
        name = f"{labels.method_label(r)} ({server_name(r)})" + (" simulated" if simulated else "")
        colour = colours[i % len(colours)]
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            ax.plot(c["x"], c[key], linestyle=":" if simulated else "-", color=colour, label=name, alpha=0.9)
            for x, y, met in zip(c["x"], c[key], c["met"], strict=True):
                ax.plot([x], [y], marker="o", markersize=6, color=colour,
                        markerfacecolor=colour if met else "white", linestyle="none")
    for ax, (key, words) in zip(axes, PANELS, strict=True):
        for b, text in bounds(recs, key):
            ax.axhline(b, color="red", linestyle="--", linewidth=1)
            ax.annotate(text, (0.01, b), xycoords=("axes fraction", "data"), color="red", fontsize=8,
                        va="bottom")
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if isinstance(y, float) and y > 0]
        if ys and max(ys) / max(min(ys), 1e-9) > 30:
            ax.set_yscale("log")
        ax.set_xlim(left=0)
        ax.set_xlabel("measured request throughput (requests/s)")
        ax.set_ylabel(f"{words} at the SLO percentile (ms)")
        ax.grid(True, alpha=0.3)
    # the legend below both panels, where it hides no point
    handles, names = axes[0].get_legend_handles_labels()
    legend = fig.legend(handles, names, fontsize=7, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.0),
                        frameon=False)
    heading = fig.suptitle(title + "\nfilled: the load point met the whole SLO; hollow: it did not", fontsize=10)
    for t in fig.findobj(matplotlib.text.Text):  # names come from suites: never markup
        t.set_usetex(False)
        t.set_parse_math(False)
    fig.tight_layout()
    fig.savefig(path, bbox_extra_artists=[legend, heading], bbox_inches="tight")
    plt.close(fig)


def write_serving_plots(records: list[dict[str, Any]], out: Path) -> list[ServingPlot]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if is_serving(r) and (r.get("task_details") or {}).get("load_points"):
            groups.setdefault((labels.hardware_key(r), r["model"]["name"]), []).append(r)
    plots = []
    for (hw, model), recs in sorted(groups.items()):
        title = f"{model}: latency under load ({hw})"
        digest = hashlib.sha256(f"{hw}|{model}".encode()).hexdigest()[:10]
        path = Path(out) / f"serving_{digest}.png"
        render(recs, title, path)
        plots.append(ServingPlot(path, title, hw, model, len(recs)))
    return plots
