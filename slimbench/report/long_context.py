"""Long-context results: accuracy heat maps (context length x needle depth) per method, a Pareto
of KV bytes at 8k tokens against long-context accuracy, and a table read against the
uncompressed model (docs/long-context.md).

Records of the long-context tasks (those whose details carry a ``generator_version``) are
grouped per (machine, model, method, task); records of one task with different lengths or depths
(two suite entries) are merged, example ids being unique. The table leads with the uncompressed
model (``baseline``) per length, then each method's accuracy as a paired delta against it on
the same examples (bootstrap interval from slimbench.measure.stats), never alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from slimbench.measure.stats import paired_delta
from slimbench.report.escape import md_text
from slimbench.report.records import machine
from slimbench.sweep.store import atomic_write_text

PARETO_AT = 8192
BASELINE = "baseline"


def is_long_context(rec: dict[str, Any]) -> bool:
    details = rec.get("task_details") or {}
    return "generator_version" in details and "score" in (details.get("per_example") or {})


def task_label(rec: dict[str, Any]) -> str:
    """The task's name, marked when the question came after the compressed context (records that
    predate the ``question`` option ran that way)."""
    after = rec["task_details"].get("question", "after-context") == "after-context"
    return rec["task"]["name"] + (" (question after context)" if after else "")


def group(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, dict[str, Any]]]]:
    """(machine, model) -> method label -> task -> merged per-example rows."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for rec in records:
        if not is_long_context(rec):
            continue
        pe = rec["task_details"]["per_example"]
        label = rec["method"].get("label") or rec["method"]["name"]
        cell = out[(machine(rec), rec["model"]["name"])][label].setdefault(
            task_label(rec), {"rows": {}, "report": rec.get("method_report") or {}})
        for i, ex_id in enumerate(pe["id"]):
            cell["rows"][ex_id] = {k: pe[k][i] for k in pe if isinstance(pe[k], list) and len(pe[k]) == len(pe["id"])}
    return out


def ordered(methods: dict) -> list[str]:
    return sorted(methods, key=lambda m: (m != BASELINE, m))


def heat(rows: dict[str, dict]) -> tuple[list[int], list[float], dict[tuple[int, float], float]] | None:
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for r in rows.values():
        if r.get("depth") is None:
            return None
        cells[(r["length"], r["depth"])].append(r["score"])
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    return lengths, depths, {k: 100 * sum(v) / len(v) for k, v in cells.items()}


def draw_heat_maps(model: str, task: str, methods: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = [(m, heat(methods[m][task]["rows"])) for m in ordered(methods) if task in methods[m]]
    maps = [(m, h) for m, h in maps if h is not None]
    if not maps:
        return None
    cols = min(4, len(maps))
    rows = math.ceil(len(maps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(maps):]:
        ax.axis("off")
    for ax, (method, (lengths, depths, acc)) in zip(axes.flat, maps, strict=False):
        grid = [[acc.get((n, d), math.nan) for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_title(method, fontsize=8)
        ax.set_xlabel("context length", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
    fig.suptitle(f"{model}: {task} accuracy (%) by context length and depth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy(cell: dict) -> float:
    scores = [r["score"] for r in cell["rows"].values()]
    return 100 * sum(scores) / len(scores)


def delta(cell: dict, base: dict) -> dict[str, Any] | None:
    common = sorted(set(cell["rows"]) & set(base["rows"]))
    if len(common) < 2:
        return None
    a = [cell["rows"][i]["score"] for i in common]
    b = [base["rows"][i]["score"] for i in common]
    return paired_delta(a, b)


def kv_at(cell_by_task: dict[str, dict], at: int = PARETO_AT) -> tuple[float | None, float | None, float | None]:
    """Measured physical KV bytes at ``at`` tokens (mean over examples of that length), and kept fractions."""
    rows = [r for c in cell_by_task.values() for r in c["rows"].values() if r.get("length") == at]
    if not rows:
        return None, None, None
    means = [sum(r[k] for r in rows) / len(rows) for k in ("kv_bytes_physical", "kept_fraction_logical",
                                                            "kept_fraction_physical")]
    return means[0], means[1], means[2]


def reported_kv(methods: dict, method: str, at: int = PARETO_AT) -> float | None:
    """KV bytes at ``at`` tokens from the method report (analytic; tested equal to the measured bytes):
    the policy's kept physical bytes, or for the uncompressed model the full cache any policy reports."""
    def step_details(cell: dict) -> list[dict]:
        return [s.get("details") or {} for s in (cell["report"].get("steps") or [])]

    key = f"kv_bytes_at_{at}_full" if method == BASELINE else f"kv_bytes_at_{at}_kept_physical"
    cells = [c for t in methods.get(method, {}).values() for c in [t]] if method != BASELINE else \
        [c for m in methods.values() for c in m.values()]
    for cell in cells:
        for d in step_details(cell):
            if d.get(key) is not None:
                return float(d[key])
    return None


def kv_point(methods: dict, method: str) -> tuple[float | None, str]:
    """KV bytes at 8k for the Pareto: measured at that length where examples ran, else reported."""
    kv, _, _ = kv_at(methods[method])
    if kv is not None:
        return kv, "measured"
    return reported_kv(methods, method), "reported"


def mean_accuracy(methods: dict, method: str) -> float | None:
    """Mean over the tasks both this method and the baseline have (so methods compare on the same tasks)."""
    tasks = [t for t in methods.get(method, {}) if t in methods.get(BASELINE, {})]
    return sum(accuracy(methods[method][t]) for t in tasks) / len(tasks) if tasks else None


def pareto_marks(pts: list[tuple[float, float, str]]) -> list[tuple[float, float, str, bool]]:
    """(x, y, label, on the front) per distinct point: methods at the same bytes and accuracy share
    one label (``a = b``) instead of printing over each other; the front is fewer bytes, more accuracy."""
    from slimbench.report.plots import pareto_front

    groups: dict[tuple[float, float], list[str]] = {}
    for x, y, m in pts:  # to the plot's resolution: 0.1 MB, 0.01 points (measured bytes differ by a few)
        groups.setdefault((round(x, 1), round(y, 2)), []).append(m)
    keys = list(groups)
    front = set(pareto_front([k[0] for k in keys], [k[1] for k in keys], higher_y_better=True))
    return [(x, y, " = ".join(groups[(x, y)]), i in front) for i, (x, y) in enumerate(keys)]


def draw_pareto(model: str, methods: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, sources = [], set()
    for m in ordered(methods):
        kv, source = kv_point(methods, m)
        acc = mean_accuracy(methods, m)
        if kv is not None and acc is not None:
            pts.append((kv / 2**20, acc, m))
            sources.add(source)
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    marks = pareto_marks(pts)
    front = sorted((x, y) for x, y, _, on in marks if on)
    ax.plot([x for x, _ in front], [y for _, y in front], color="tab:green", lw=1, zorder=1, label="Pareto front")
    for x, y, label, _ in marks:
        ax.scatter([x], [y], color="black" if label == BASELINE else "tab:blue", s=22, zorder=2)
        ax.annotate(label.replace(" = ", "\n= "), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                    va="bottom")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel(f"KV cache MB at {PARETO_AT} tokens (physical; {' / '.join(sorted(sources))})")
    ax.set_ylabel("long-context accuracy (%), mean over tasks")
    ax.set_title(f"{model}: KV bytes vs long-context accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt_delta(d: dict | None) -> str:
    if d is None:
        return "–"
    lo, hi = d["ci_low"], d["ci_high"]
    mark = "" if d.get("within_noise") else " *"
    return f"{100 * d['delta']:+.0f} [{100 * lo:+.0f}, {100 * hi:+.0f}]{mark}"


def table(model: str, methods: dict) -> str:
    base = methods.get(BASELINE, {})
    tasks = sorted({t for m in methods.values() for t in m})
    lines = [f"### {md_text(model)}", ""]
    if base:
        lengths = sorted({r["length"] for c in base.values() for r in c["rows"].values()})
        lines += ["Uncompressed model (baseline), accuracy % per context length:", "",
                  "| task | " + " | ".join(str(n) for n in lengths) + " | all |",
                  "|---" * (len(lengths) + 2) + "|"]
        for t in tasks:
            if t not in base:
                continue
            rows = base[t]["rows"].values()
            per = []
            for n in lengths:
                s = [r["score"] for r in rows if r["length"] == n]
                per.append(f"{100 * sum(s) / len(s):.0f} ({len(s)})" if s else "–")
            lines.append(f"| {md_text(t)} | " + " | ".join(per) + f" | {accuracy(base[t]):.0f} |")
        lines.append("")
    lines += [f"Compressed: Δ accuracy (points) against the baseline on the same examples, [95% paired bootstrap "
              f"interval], * outside noise; KV MB at {PARETO_AT} tokens, measured, or (r) from the method report "
              "(analytic); kept: logical / physical share of the full cache at the longest length run.",
              "", "| method | " + " | ".join(md_text(t) for t in tasks) + f" | mean acc | KV MB @{PARETO_AT} | kept |",
              "|---" * (len(tasks) + 4) + "|"]
    for m in ordered(methods):
        cells = []
        for t in tasks:
            c = methods[m].get(t)
            if c is None:
                cells.append("–")
            elif m == BASELINE or t not in base:
                cells.append(f"{accuracy(c):.0f}")
            else:
                cells.append(fmt_delta(delta(c, base[t])))
        longest = max((r["length"] for c in methods[m].values() for r in c["rows"].values()), default=None)
        _, fl, fp = kv_at(methods[m], longest) if longest else (None, None, None)
        kv, source = kv_point(methods, m)
        acc = mean_accuracy(methods, m)
        kept = f"{fl:.3f} / {fp:.3f}" if fl is not None else "–"
        acc_text = f"{acc:.1f}" if acc is not None else "–"
        kv_text = f"{kv / 2**20:.1f}" + ("" if source == "measured" else " (r)") if kv is not None else "–"
        lines.append(f"| {md_text(m)} | " + " | ".join(cells) + f" | {acc_text} | {kv_text} | {kept} |")
    return "\n".join(lines) + "\n"


def write_long_context(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Heat maps, the Pareto plot and ``long_context.md`` into ``out/long_context`` (nothing if no such records)."""
    groups = group(records)
    if not groups:
        return []
    folder = Path(out) / "long_context"
    folder.mkdir(parents=True, exist_ok=True)
    files, parts = [], ["# Long-context accuracy under KV-cache compression", ""]
    for (hw, model), methods in sorted(groups.items()):
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{model}")[:60]
        parts.append(table(model, methods) + f"\n(machine: {md_text(hw)})\n")
        tasks = sorted({t for m in methods.values() for t in m})
        for t in tasks:
            name = t.replace(" (question after context)", "-after-context")
            p = draw_heat_maps(model, t, methods, folder / f"heatmap_{slug}_{name}.png")
            if p is not None:
                files.append(p)
                parts.append(f"![{md_text(t)} heat map]({p.name})\n")
        p = draw_pareto(model, methods, folder / f"pareto_kv_{slug}.png")
        if p is not None:
            files.append(p)
            parts.append(f"![KV bytes vs accuracy]({p.name})\n")
    md = folder / "long_context.md"
    atomic_write_text(md, "\n".join(parts))
    return [md, *files]
