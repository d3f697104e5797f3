"""What a reader sees of a record: method labels and families, task protocols, efficiency regimes."""

from __future__ import annotations

import json
from typing import Any

from slimbench.registry import METHODS, TASKS
from slimbench.specs import step_label


def steps(rec: dict[str, Any]) -> list[dict[str, Any]]:
    s = rec["method"].get("steps")
    if isinstance(s, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in s):
        return s
    return [{"name": rec["method"]["name"], "params": rec["method"].get("params") or {}}]


def method_label(rec: dict[str, Any]) -> str:
    """The label from the record's settings, with today's labeller (key settings always shown).

    A step of a method this installation does not know keeps the label stored in the record.
    """
    parts = []
    for s in steps(rec):
        if s["name"] not in METHODS:
            return str(rec["method"].get("label") or rec["method"]["name"])
        parts.append(step_label(s["name"], s.get("params") or {}))
    return " + ".join(parts)


def method_identity(rec: dict[str, Any]) -> str:
    """Method config and version: what must be equal for two records to be the same method."""
    ident = [
        {"name": s["name"], "params": s.get("params") or {}, "version": s.get("version"), "provider": s.get("provider")}
        for s in steps(rec)
    ]
    return json.dumps(ident, sort_keys=True, default=str)


def versions(rec: dict[str, Any]) -> str:
    return "+".join(str(s.get("version") or "?") for s in steps(rec))


def family(rec: dict[str, Any]) -> str:
    """The method's family: as stored in the record (``method.families``, one per step, or
    ``method.family``; so a plugin's family shows without the plugin), else from this
    installation's registry."""
    stored = rec["method"].get("families")
    the_steps = steps(rec)
    if not (isinstance(stored, list) and len(stored) == len(the_steps) and all(isinstance(f, str) for f in stored)):
        stored = None
    if stored is None and isinstance(rec["method"].get("family"), str):
        return rec["method"]["family"]
    fams = []
    for i, s in enumerate(the_steps):
        if stored is not None:
            fam = stored[i]
        else:
            fam = METHODS.entries[s["name"]].family if s["name"] in METHODS else "unknown"
        if fam not in fams:
            fams.append(fam)
    return "+".join(fams)


def task_info(rec: dict[str, Any]) -> dict[str, Any]:
    """What the record stores about its task beyond the spec (quality and paired metric, timed)."""
    info = rec.get("task_info")
    return info if isinstance(info, dict) else {}


def hardware_key(rec: dict[str, Any]) -> str:
    hw = rec["hardware"]
    env = rec.get("environment") or {}
    proc = env.get("gpu") or env.get("cpu") or "?"
    threads = hw.get("threads")
    return f"{hw.get('device', '?')}/{hw.get('dtype', '?')}/{threads} thread{'s' if threads != 1 else ''} ({proc})"


def task_key(rec: dict[str, Any]) -> str:
    t = rec["task"]
    return f"{t['name']}@{t.get('version', '?')}" + json.dumps(t.get("params") or {}, sort_keys=True, default=str)


def quality_metric(task_name: str) -> str | None:
    return TASKS.get(task_name).quality_metric if task_name in TASKS else None


def quality_metric_of(rec: dict[str, Any]) -> str | None:
    """The record's quality metric: as stored in it, else the registered task's."""
    stored = task_info(rec).get("quality_metric")
    return stored if isinstance(stored, str) else quality_metric(rec["task"]["name"])


def paired_metric_of(rec: dict[str, Any]) -> str | None:
    """The per-example metric a paired comparison uses: as stored, else the registered task's."""
    stored = task_info(rec).get("paired_metric")
    if isinstance(stored, str):
        return stored
    return paired_metric(rec["task"]["name"]) or quality_metric_of(rec)


def paired_metric(task_name: str) -> str | None:
    task = TASKS.get(task_name) if task_name in TASKS else None
    return (task.paired_metric or task.quality_metric) if task else None


def regime(rec: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt_len, new_tokens, batch_size) of an efficiency cell: the details' regime, else its params."""
    details = rec.get("task_details") or {}
    src = details.get("regime") if isinstance(details.get("regime"), dict) else rec["task"].get("params") or {}
    try:
        return int(src["prompt_len"]), int(src["new_tokens"]), int(src["batch_size"])
    except (KeyError, TypeError, ValueError):
        return None


def regime_label(r: tuple[int, int, int]) -> str:
    """Short: ``b1 p128 n32`` = batch 1, 128-token prompt, 32 new tokens."""
    return f"b{r[2]} p{r[0]} n{r[1]}"


def regime_words(r: tuple[int, int, int]) -> str:
    return f"batch {r[2]}, {r[0]}-token prompt, {r[1]} new tokens"


def protocol(rec: dict[str, Any]) -> str:
    """Corpus, split, window length and windows (or examples) of a quality cell, in words."""
    t = rec["task"]
    p, d = t.get("params") or {}, rec.get("task_details") or {}
    parts = []
    if "corpus" in p or "split" in p:
        parts.append(" ".join(str(x) for x in (p.get("corpus"), p.get("split")) if x is not None))
    if "seqlen" in p:
        parts.append(f"seqlen {p['seqlen']}")
    if "windows" in d:
        avail = d.get("windows_available")
        parts.append(f"{d['windows']} windows" + (f" of {avail}" if avail not in (None, d["windows"]) else ""))
    elif p.get("max_windows") is not None:
        parts.append(f"at most {p['max_windows']} windows")
    n = d.get("n") or d.get("examples") or p.get("limit") or p.get("max_examples")
    if n is not None and "windows" not in d:
        parts.append(f"{n} examples")
    reg = regime(rec) if "prompt_len" in p or isinstance(d.get("regime"), dict) else None
    if reg is not None:
        parts.append(regime_words(reg))
    if "tokens" in d:
        parts.append(f"{d['tokens']:,} tokens" if isinstance(d["tokens"], int) else f"{d['tokens']} tokens")
    head = f"{t['name']}@{t.get('version', '?')}"
    return head + (": " + ", ".join(parts) if parts else "")
