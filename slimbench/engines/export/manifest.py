"""The manifest written beside every export: what was exact, what was approximated, by how much.

One JSON file per exported model (``<file or folder>.manifest.json``): the format and its
library versions, the files with their sizes and SHA-256, one row per tensor (target type,
where the values came from, ``exact``, ``max_abs_change``, ``rel_rms_change`` against the
weight SlimBench's model holds) and a summary a reader checks first: how many tensors are
bit-exact, which were approximated (a cast, a re-quantization) and the largest change. A pruned
weight's row also gives its measured sparsity and N:M pattern: neither format stores sparsity
(GGUF has no sparse type; compressed-tensors 0.20 and vLLM 0.32 removed the sparse-bitmask and
2:4 formats), so those zeros are written dense and the summary counts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_entry(paths: list[Path], root: Path) -> list[dict[str, Any]]:
    return [{"file": str(p.relative_to(root)), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(paths)]


def summarize(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    approx = [t for t in tensors if not t.get("exact")]
    worst = max(approx, key=lambda t: t.get("rel_rms_change", 0.0), default=None)
    sparse = [t for t in tensors if "sparsity" in t]
    extra = {"sparse": {
        "tensors": len(sparse), "patterns": sorted({t.get("pattern", "unstructured") for t in sparse}),
        "mean_sparsity": sum(t["sparsity"] for t in sparse) / len(sparse),
    }} if sparse else {}
    return {
        "tensors": len(tensors),
        "exact": len(tensors) - len(approx),
        "approximated": len(approx),
        "requantized": sorted(t["tensor"] for t in tensors if t.get("requantized")),
        "largest_rel_rms_change": None if worst is None else {
            "tensor": worst["tensor"], "value": worst["rel_rms_change"]},
        "max_abs_change": max((t.get("max_abs_change", 0.0) for t in tensors), default=0.0),
        **extra,
    }


def manifest_path(target: Path) -> Path:
    return target.with_name(target.name + ".manifest.json")


def write(target: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` beside ``target`` atomically; returns its path."""
    path = manifest_path(target)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def read(target: Path) -> dict[str, Any]:
    return json.loads(manifest_path(target).read_text())
