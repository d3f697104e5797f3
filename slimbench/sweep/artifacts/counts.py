"""What a run did to its models, in one line: compressed, reused from the artifact cache, unchanged
(the baseline), execution paths built (compiled), each group counted once, seconds that add up."""

from __future__ import annotations

from typing import Any

from slimbench.config import canonical_json
from slimbench.sweep.artifacts.cache import configured_root


def _step_families(record: dict[str, Any]) -> list[str]:
    """Each step's family: stored in the record, else from this installation's registry."""
    stored = (record.get("method") or {}).get("families")
    steps = (record.get("method_report") or {}).get("steps") or []
    if isinstance(stored, list) and len(stored) == len(steps):
        return [str(f) for f in stored]
    from slimbench.registry import METHODS

    return [METHODS.get(s["name"]).family if s.get("name") in METHODS else "unknown" for s in steps]


def run_counts(records: list[dict[str, Any]], since: str) -> dict[str, float]:
    """What a run did to its groups (records started at or after ``since``), each group counted once:
    ``compressed`` (a compressing step ran; its steps' seconds), ``reused`` (loaded from the artifact
    cache; loading seconds), ``unchanged`` (the baseline: nothing to compress), ``built`` (an
    execution path built, e.g. compiled; its steps' seconds, apart from compression)."""
    groups: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("started_at", "") >= since and r.get("method_report"):
            key = canonical_json([r["model"].get("name"), r["model"].get("revision"),
                                  (r["method"] or {}).get("steps"), r["hardware"]])
            groups[key] = r
    counts = {"compressed": 0, "reused": 0, "unchanged": 0, "built": 0, "compress_seconds": 0.0,
              "build_seconds": 0.0, "load_seconds": 0.0}
    for r in groups.values():
        rep = r["method_report"]
        art = rep.get("artifact") or {}
        if art.get("reused"):
            counts["reused"] += 1
            counts["load_seconds"] += art.get("load_seconds", 0.0)
            continue
        steps = rep.get("steps") or []
        fams = _step_families(r)
        compress = [s for s, f in zip(steps, fams, strict=False) if f not in ("baseline", "acceleration")]
        build = [s for s, f in zip(steps, fams, strict=False) if f == "acceleration"]
        if not compress and not build:
            counts["unchanged"] += 1
        if compress:
            counts["compressed"] += 1
            counts["compress_seconds"] += sum(float(s.get("seconds") or 0.0) for s in compress)
        if build:
            counts["built"] += 1
            counts["build_seconds"] += sum(float(s.get("seconds") or 0.0) for s in build)
    return counts


def counts_line(counts: dict[str, float]) -> str:
    line = (f"compressed {counts['compressed']}, reused {counts['reused']} from the artifact cache "
            f"(compressing {counts['compress_seconds']:.1f} s, loading artifacts {counts['load_seconds']:.1f} s)")
    if counts.get("unchanged"):
        line += f"; {counts['unchanged']} unchanged (baseline, nothing to compress)"
    if counts.get("built"):
        line += f"; built {counts['built']} execution path(s) ({counts['build_seconds']:.1f} s)"
    if configured_root() is None:
        line += "; the cache is off"
    return line
