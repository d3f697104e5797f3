"""`list methods|tasks|models|corpora`: each registered entry with its parameters, defaults and description."""

from __future__ import annotations

import argparse

from slimbench.config import describe_fields
from slimbench.registry import CORPORA, METHODS, MODELS, TASKS


def render_config(cls) -> list[str]:
    rows = describe_fields(cls)
    if not rows:
        return ["    (no parameters)"]
    w = max(len(r[0]) for r in rows)
    return [f"    {n:<{w}}  {t} = {d}" + (f"  -- {desc}" if desc else "") for n, t, d, desc in rows]


def declarations(m) -> str:
    """What a method needs and what it may follow in a `steps` chain."""
    needs = []
    if m.uses_calibration:
        need = m.calibration_need if isinstance(m.calibration_need, str) else "declared budget"
        needs.append(f"calibration data ({need or 'activation-statistics'})")
    if m.requires_gpu:
        needs.append("a CUDA GPU")
    provider = METHODS.provider(m.name)
    follows = ", ".join(m.follows) or "nothing: use it alone"
    return "; ".join([f"needs {' and '.join(needs)}" if needs else "needs no data", f"may follow: {follows}",
                      f"version {m.version}" + (f" from {provider}" if provider else "")])


def render(what: str) -> str:
    lines: list[str] = []
    if what == "methods":
        for m in METHODS:
            head = [f"{m.name}  [{m.family}]  {m.description}", f"    ({declarations(m)})"]
            lines += [*head, *render_config(m.config), ""]
    elif what == "tasks":
        for t in TASKS:
            lines += [f"{t.name}  (version {t.version})  {t.description}", *render_config(t.config), ""]
    elif what == "models":
        for m in MODELS:
            lines.append(f"{m.name}  {m.description}")
        lines.append("(any Hugging Face hub id `org/name` or local folder also works)")
    elif what == "corpora":
        for c in CORPORA:
            lines.append(f"{c.name}  {c.description}")
            for split in ("calibration", "validation", "test"):
                try:
                    docs = c.manifest(split)["documents"]
                except Exception as exc:  # data not available here (hub-only corpora offline)
                    lines.append(f"    {split}: not available: {exc}")
                    continue
                shown = ", ".join(docs[:40]) + (f", ... ({len(docs)} documents)" if len(docs) > 40 else "")
                lines.append(f"    {split}: {shown}")
    return "\n".join(lines).rstrip()


def cmd_list(args: argparse.Namespace) -> int:
    print(render(args.what))
    return 0


def register(sub) -> None:
    li = sub.add_parser("list", help="list registered methods, tasks, models or corpora")
    li.add_argument("what", choices=["methods", "tasks", "models", "corpora"])
    li.set_defaults(fn=cmd_list)
