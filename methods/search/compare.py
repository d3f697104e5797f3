"""Searched against uniform configurations, from stored records: the table and the hypervolumes.

For each model, family and perplexity task (one corpus split, one protocol), the records of
uniform configurations (``rtn``; ``magnitude`` / ``wanda`` unstructured; ``svd-llm`` at a uniform
ratio) and of ``auto`` give points (stored bytes, perplexity). For each searched point, its
budget is the stored bytes of the uniform record its ``budget_like`` names (else its own
bytes); it *wins* if its perplexity is below that of every uniform configuration stored in no
more bytes than that budget (bytes equal within ``tolerance``, relative: safetensors headers
differ by a few bytes).

Hypervolume: of each front in (stored MB, ln perplexity), both minimised, with the reference
point (largest stored MB, largest ln perplexity) over both sets of points, so the two numbers
share one frame. ln because perplexities span orders of magnitude: in linear units the
worst point would decide the area.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from slimbench.methods.search.allocate import dominates_front, hypervolume, pareto_front
from slimbench.methods.search.choices import Choice, parse_choice

GRID_DEFAULTS = {"symmetric": False}


@dataclass
class Point:
    kind: str  # uniform | searched
    label: str
    stored_bytes: int
    effective_bits: float | None
    ppl: float
    budget_like: str | None = None
    chosen: str | None = None

    @property
    def xy(self) -> tuple[float, float]:
        return self.stored_bytes / 1e6, math.log(self.ppl)


def uniform_key(step: dict[str, Any]) -> tuple[str, str] | None:
    """(family, choice key) of a single-step uniform record that a search could mix, else None."""
    p, name = step.get("params", {}), step.get("name")
    if name == "rtn" and not p.get("symmetric", False):
        return "quantization", Choice("rtn", bits=p["bits"], group_size=p.get("group_size")).key
    unstructured = p.get("pattern", "unstructured") == "unstructured" and not p.get("include_lm_head", False)
    if name == "magnitude" and unstructured and p.get("scope", "layer") == "layer":
        return "pruning", parse_choice(f"magnitude:{p['sparsity']:g}").key
    if name == "wanda" and unstructured:
        return "pruning", parse_choice(f"wanda:{p['sparsity']:g}").key
    uniform_ratio = p.get("rank") is None and p.get("allocation", "uniform") == "uniform" and not p.get("targets")
    if name == "svd-llm" and uniform_ratio and p.get("damping", 1e-6) == 1e-6:
        return "lowrank", parse_choice(f"svd-llm:{p.get('ratio', 0.2):g}").key
    return None


def collect(records: list[dict[str, Any]], split: str = "test") -> dict[tuple, list[Point]]:
    """(model, family, task params) -> points, from ok perplexity records on ``split``."""
    groups: dict[tuple, list[Point]] = {}
    for r in records:
        task = r.get("task", {})
        if r.get("status") != "ok" or task.get("name") != "perplexity" or task.get("params", {}).get("split") != split:
            continue
        steps = r["method"].get("steps", [])
        if len(steps) != 1 or "perplexity" not in r.get("metrics", {}):
            continue
        rep = r.get("method_report") or {}
        ppl = r["metrics"]["perplexity"]["value"]
        common = dict(stored_bytes=rep.get("stored_bytes"), effective_bits=rep.get("effective_bits"), ppl=ppl)
        if steps[0]["name"] == "auto":
            params = steps[0]["params"]
            family = params.get("family", "quantization")
            search = (rep.get("steps") or [{}])[0].get("details", {}).get("search") or {}
            label = f"auto ({params.get('budget_like') or params.get('budget_bits') or params.get('budget_bytes')})"
            pt = Point("searched", label, budget_like=params.get("budget_like"), chosen=search.get("chosen"), **common)
        else:
            fk = uniform_key(steps[0])
            if fk is None:
                continue
            family, key = fk
            pt = Point("uniform", key, **common)
        gkey = (r["model"]["name"], family, json.dumps(task.get("params", {}), sort_keys=True))
        groups.setdefault(gkey, []).append(pt)
    return groups


def verdicts(points: list[Point], tolerance: float = 1e-4) -> list[dict[str, Any]]:
    """For each searched point: its budget, the best uniform within it, and whether it wins."""
    uniform = [p for p in points if p.kind == "uniform"]
    out = []
    for s in sorted((p for p in points if p.kind == "searched"), key=lambda p: p.stored_bytes):
        like = next((u for u in uniform if s.budget_like and u.label == parse_choice(s.budget_like).key), None)
        budget = like.stored_bytes if like is not None else s.stored_bytes
        fitting = [u for u in uniform if u.stored_bytes <= budget * (1 + tolerance)]
        best = min(fitting, key=lambda u: u.ppl, default=None)
        out.append({
            "searched": s,
            "budget_bytes": budget,
            "within_budget": s.stored_bytes <= budget * (1 + tolerance),
            "best_uniform": best,
            "wins": best is not None and s.ppl < best.ppl and s.stored_bytes <= budget * (1 + tolerance),
            # the search returned the uniform setting itself (e.g. the cheapest: nothing to trade)
            "tie": best is not None and s.ppl == best.ppl and s.stored_bytes <= budget * (1 + tolerance),
        })
    return out


def fronts(points: list[Point], tolerance: float = 1e-4) -> dict[str, Any]:
    """Hypervolumes and dominance; dominance both strictly and with bytes equal within ``tolerance``
    (as the verdicts count them)."""
    xy = {k: [p.xy for p in points if p.kind == k] for k in ("uniform", "searched")}
    every = xy["uniform"] + xy["searched"]
    if not xy["uniform"] or not xy["searched"]:
        return {"reference": None, "hv_uniform": None, "hv_searched": None, "searched_dominates": None,
                "searched_dominates_strictly": None}
    ref = (max(x for x, _ in every), max(y for _, y in every))
    a, b = pareto_front(xy["searched"]), pareto_front(xy["uniform"])
    return {
        "reference": ref,
        "hv_uniform": hypervolume(xy["uniform"], ref),
        "hv_searched": hypervolume(xy["searched"], ref),
        "searched_dominates": dominates_front(a, b, tolerance),
        "searched_dominates_strictly": dominates_front(a, b),
    }


def _md(s: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render(groups: dict[tuple, list[Point]], tolerance: float = 1e-4) -> str:
    lines: list[str] = []
    for (model, family, task), points in sorted(groups.items()):
        lines += [f"## {_md(model)} - {_md(family)} - perplexity {_md(task)}", ""]
        lines += ["| kind | configuration | stored MB | eff. bits | perplexity | on the front |",
                  "|---|---|---|---|---|---|"]
        front = {k: set(pareto_front([p.xy for p in points if p.kind == k])) for k in ("uniform", "searched")}
        for p in sorted(points, key=lambda p: (p.stored_bytes, p.kind)):
            bits = f"{p.effective_bits:.3f}" if p.effective_bits is not None else "-"
            chosen = f" -> {p.chosen}" if p.chosen else ""
            lines.append(f"| {p.kind} | {_md(p.label + chosen)} | {p.stored_bytes / 1e6:.3f} | {bits} | "
                         f"{p.ppl:.2f} | {'yes' if p.xy in front[p.kind] else ''} |")
        lines += ["", "| searched | budget MB | searched MB | best uniform within budget | its ppl | searched ppl "
                  "| wins |", "|---|---|---|---|---|---|---|"]
        for v in verdicts(points, tolerance):
            s, b = v["searched"], v["best_uniform"]
            lines.append(f"| {_md(s.label)} | {v['budget_bytes'] / 1e6:.3f} | {s.stored_bytes / 1e6:.3f} | "
                         f"{_md(b.label) if b else '-'} | {f'{b.ppl:.2f}' if b else '-'} | {s.ppl:.2f} | "
                         f"{'yes' if v['wins'] else 'tie' if v['tie'] else 'no'} |")
        f = fronts(points, tolerance)
        if f["reference"] is not None:
            rx, ry = f["reference"]
            verdict = "yes" if f["searched_dominates_strictly"] else (
                f"yes with bytes equal within {tolerance:g}, strictly no" if f["searched_dominates"] else "no")
            lines += ["", "Hypervolume in (stored MB, ln perplexity), reference "
                      f"({rx:.3f} MB, perplexity {math.exp(ry):.2f}): "
                      f"uniform {f['hv_uniform']:.4f}, searched {f['hv_searched']:.4f}; searched front dominates "
                      f"the uniform front: {verdict}"]
        lines.append("")
    return "\n".join(lines) if lines else "no perplexity records of uniform or searched configurations found\n"
