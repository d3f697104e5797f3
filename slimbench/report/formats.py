"""Text outputs of the leaderboard: Markdown, CSV and LaTeX (booktabs).

Every string from a suite, a plugin or a record goes through the escaping of its format
(slimbench.report.escape); numbers are formatted once (slimbench.report.formatting).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from slimbench.report.escape import csv_text, latex_text, md_text
from slimbench.report.formatting import fmt
from slimbench.report.records import Loaded
from slimbench.report.table import FLAGS, Leaderboard

INTRO = (
    "Δ = value minus the same model's `baseline` on the same hardware and task protocol; the noise "
    "column pairs both models example by example (95% bootstrap interval of the per-example "
    "difference, in the unit it names). `simulated` rows hold masks or fake-quant values in a dense "
    "model: their latency and memory are the dense model's, and they claim no speed-up. A timing "
    "marked `(noisy)` was taken while other processes used the cores, one marked `(under-sampled)` "
    "with fewer repeats or seconds than its protocol asks: neither is a result, and neither may be "
    "compared; `timing flags` says why. `sparsity` counts weights that are exactly zero, whether a "
    "pruner removed them or a quantizer rounded them to zero. `warnings` are what the method reported "
    "about its own settings."
)


def cell_text(lb: Leaderboard, row: pd.Series, col: str) -> str:
    """A formatted value with its timing flag or note: ``23.5 (noisy)``, ``0.133 (rounded to zero)``."""
    flag = lb.note(row, col)
    text = fmt(row.get(col, ""))
    return f"{text} ({flag})" if flag and text not in ("", "–") else text


def markdown_table(df: pd.DataFrame, cols: list[str], lb: Leaderboard | None = None) -> str:
    head = "| " + " | ".join(md_text(c) for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"

    def text(r: pd.Series, c: str) -> str:
        return cell_text(lb, r, c) if lb is not None else fmt(r.get(c, ""))

    body = ["| " + " | ".join(md_text(text(r, c)) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join([head, sep, *body])


def timing_notes(sec: pd.DataFrame) -> list[str]:
    """How the timings were taken, one line per group of cells measured together (or alone, per
    reason), per regime; then what the task refused to report."""
    groups: dict[tuple, list[str]] = {}
    for _, r in sec.iterrows():
        for where, it in r["_interleaving"].items():
            groups.setdefault((where, it["done"], it["group"], it["rounds"]), []).append(str(r["method"]))
    out = []
    for (where, done, group, rounds), rows in groups.items():
        if done:
            out.append(f"[{where}] interleaved: {', '.join(group)} ({rounds})")
        else:
            out.append(f"[{where}] {group[0]}: {', '.join(rows)}")
    for _, r in sec.iterrows():
        out += [f"{r['method']}: {e}" for e in r["_errors"]]
    return list(dict.fromkeys(out))


def protocol_table(lb: Leaderboard, sec: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(column, protocol, unit) of each quality column this section has values for."""
    return [(q.col, q.protocol, q.unit) for q in lb.quality if sec[q.col].notna().any()]


def failed_rows(loaded: Loaded) -> list[dict[str, str]]:
    from slimbench.report.labels import method_label

    out = []
    for r in loaded.failed:
        e = r.get("error") if isinstance(r.get("error"), dict) else {}
        out.append(
            {
                "model": str(r["model"]["name"]),
                "method": method_label(r),
                "task": f"{r['task']['name']}@{r['task'].get('version', '?')}",
                "stage": str(e.get("stage", "?")),
                "error": f"{e.get('type', '?')}: {e.get('message', '')}",
                "run_id": str(r["run_id"]),
            }
        )
    return out


def markdown_report(lb: Leaderboard | None, loaded: Loaded, plots: list) -> str:
    md = ["# SlimBench leaderboard", ""]
    md += ["Results from: " + ", ".join(md_text(s) for s in loaded.sources), ""]
    if lb is None:
        md += ["No ok records yet.", ""]
    else:
        md += [INTRO, ""]
        cols = lb.columns()
        for hw, sec in lb.df.groupby("hardware", sort=False):
            md += [f"## {md_text(hw)}", "", "| column | protocol | unit |", "|---|---|---|"]
            md += [f"| {md_text(c)} | {md_text(p)} | {md_text(u)} |" for c, p, u in protocol_table(lb, sec)]
            md += ["", markdown_table(sec, cols, lb), ""]
            notes = timing_notes(sec)
            if notes:
                md += ["Timings:", ""] + [f"- {md_text(n)}" for n in notes] + [""]
            for p in plots:
                if p.hardware == hw:
                    md.append(f"![{md_text(p.title.splitlines()[0])}]({p.path.name})")
            md.append("")
    if loaded.failed:
        md += ["## Failed cells", "", "Each cell's latest attempt failed; earlier attempts stay in the store.", ""]
        md += ["| model | method | task | stage | error |", "|---|---|---|---|---|"]
        for f in failed_rows(loaded):
            md.append(
                "| " + " | ".join(md_text(f[k][:300]) for k in ("model", "method", "task", "stage", "error")) + " |"
            )
        md.append("")
    if loaded.problems:
        md += ["## Skipped files", "", "These files are not readable records and were left out:", ""]
        md += [f"- {md_text(p)}" for p in loaded.problems]
        md.append("")
    return "\n".join(md) + "\n"


def csv_report(lb: Leaderboard) -> str:
    """Every column, numbers unformatted; a timed column with flagged cells gets a ``<column> flag``
    column right after it, a column with notes ``<column> note`` ("rounded to zero"), and a roofline
    column the limit it divides by (``<column> of``)."""
    cols = ["hardware", "model", "method", "method_name", "family", "execution"]
    cols += [c for c in lb.columns(all_efficiency=True) if c not in cols]
    for c in (FLAGS, "warnings"):
        if c not in cols:
            cols.append(c)
    df = lb.df[cols].copy()
    for extra, key in ((" flag", "_flags"), (" note", "_notes"), (" of", "_denominators")):
        for c in list(df.columns):
            values = lb.df[key].map(lambda d, c=c: d.get(c, ""))
            if values.astype(bool).any():
                df.insert(df.columns.get_loc(c) + 1, c + extra, values)
    for c in df.columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            df[c] = df[c].map(csv_text)
    return df.to_csv(index=False)


LATEX_MARK = {"noisy": "$^{n}$", "under-sampled": "$^{u}$"}


def latex_report(lb: Leaderboard) -> str:
    """One booktabs table per hardware section, the protocol and hardware in its caption."""
    out = ["% SlimBench leaderboard; needs \\usepackage{booktabs}", ""]
    for n, (hw, sec) in enumerate(lb.df.groupby("hardware", sort=False), start=1):
        quality = [q for q in lb.quality if sec[q.col].notna().any()]
        size = [c for c in ("stored MB", "eff. bits") if sec[c].notna().any()]
        eff = [
            e.col
            for e in lb.efficiency
            if e.main and e.col.split(" [")[0] in ("decode ms/token", "peak mem MiB") and sec[e.col].notna().any()
        ]
        head = ["Model", "Method", "Flags"]
        for q in quality:
            head += [latex_text(f"{q.col} ({q.unit})" if q.unit else q.col), r"$\Delta$"]
        head += [latex_text(c) for c in size + eff]
        protocols = "; ".join(latex_text(q.protocol) for q in quality) or "no quality task"
        caption = (
            f"Protocol: {protocols}. Hardware: {latex_text(hw)}. $\\Delta$: difference to the same model's "
            "baseline. Flags: sim = simulated (dense masks or fake-quant: no speed-up claimed), "
            "noisy = a timing taken while other processes used the cores, marked $^{n}$ beside each such value; "
            "under-sampled timings are marked $^{u}$ (fewer repeats or seconds than the protocol asks): "
            "neither is a result. warn = the method warned about its settings."
        )
        out += [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            f"\\caption{{{caption}}}",
            f"\\label{{tab:slimbench-{n}}}",
            r"\begin{tabular}{ll" + "l" + "r" * (len(head) - 3) + "}",
            r"\toprule",
            " & ".join(head) + r" \\",
            r"\midrule",
        ]
        for _, r in sec.iterrows():
            flags = [
                f
                for f, on in (
                    ("sim", r["execution"] == "simulated"),
                    ("noisy", "noisy" in r["_flags"].values()),
                    ("under-sampled", "under-sampled" in r["_flags"].values()),
                    ("warn", bool(r["warnings"])),
                )
                if on
            ]
            cells: list[Any] = [r["model"], r["method"], ",".join(flags)]
            for q in quality:
                cells += [r[q.col], r[q.delta]]
            cells += [r[c] for c in size]
            text = [latex_text(fmt(v)).replace("–", "--") for v in cells]
            text += [latex_text(fmt(r[c])).replace("–", "--") + LATEX_MARK.get(lb.flag(r, c), "") for c in eff]
            out.append(" & ".join(text) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
