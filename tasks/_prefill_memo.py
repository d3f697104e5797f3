"""Recorded prefills shared between cells: one exact prefill per (model weights, prompt).

A KV eviction policy only changes what its cache *keeps* after each layer's attention, so the
prefill of a prompt is the same computation under every policy. The long-context tasks ask the
policy's cache factory to ``record`` that prefill once (keys, values, the last queries, the
attention column sums; methods/kvcache/policy.py) and to ``from_record`` it afterwards: every
policy judged on the same weights and prompt then pays one prefill, not one each. Replaying
gives the same bits as running the prefill live (tests/test_kv_eviction.py).

Records live in ``<cache>/kv-prefill/<key>.safetensors`` (+ ``.json``), keyed by a SHA-256 of the
model's tensors, the prompt's token ids and the record format; writes are atomic; the folder is
capped at ``$SLIMBENCH_KV_PREFILL_GB`` (default 20) by deleting the least recently used records.
Delete the folder at any time: records are only a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "kv-prefill/1"


def memo_dir() -> Path:
    from slimbench.zoo.models import cache_dir

    return cache_dir() / "kv-prefill"


def model_fingerprint(lm) -> str:
    """SHA-256 of the model's tensors (names, dtypes, shapes, bytes) and how attention runs."""
    cached = getattr(lm, "_kv_fingerprint", None)
    if cached is not None:
        return cached
    from slimbench.modeling import unique_tensors

    h = hashlib.sha256()
    h.update(f"{type(lm.model).__name__}/{torch.__version__}/{lm.device}".encode())
    for name, t in sorted(unique_tensors(lm.model).items()):
        h.update(f"{name}/{t.dtype}/{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    lm._kv_fingerprint = h.hexdigest()
    return lm._kv_fingerprint


def key_of(lm, ids: torch.Tensor) -> str:
    h = hashlib.sha256(f"{FORMAT}/{model_fingerprint(lm)}/".encode())
    h.update(ids.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:40]


def load(key: str, folder: Path) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    tensors, meta = folder / f"{key}.safetensors", folder / f"{key}.json"
    if not (tensors.exists() and meta.exists()):
        return None
    try:
        info = json.loads(meta.read_text())
        record = {"tensors": load_file(str(tensors)), "scaling": info["scaling"], "seen": info["seen"]}
    except (OSError, ValueError, KeyError):
        return None  # a damaged record is recomputed
    os.utime(meta)  # least recently used goes first
    return record


def store(key: str, record: dict[str, Any], folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for suffix, write in ((".safetensors", lambda p: save_file(record["tensors"], p)),
                          (".json", lambda p: Path(p).write_text(json.dumps(
                              {"scaling": record["scaling"], "seen": record["seen"], "format": FORMAT})))):
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, folder / f"{key}{suffix}")
    prune(folder)


def prune(folder: Path) -> None:
    cap = float(os.environ.get("SLIMBENCH_KV_PREFILL_GB", "20")) * 2**30
    metas = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    sizes = {m: m.stat().st_size + (m.with_suffix(".safetensors").stat().st_size
                                    if m.with_suffix(".safetensors").exists() else 0) for m in metas}
    total = sum(sizes.values())
    for m in metas:
        if total <= cap:
            break
        m.with_suffix(".safetensors").unlink(missing_ok=True)
        m.unlink(missing_ok=True)
        total -= sizes[m]


def recorded_cache(lm, factory, ids: torch.Tensor, folder: Path | None) -> tuple[Any, bool, torch.Tensor]:
    """The cache after the prompt ``ids``, from a stored record when there is one.

    ``factory``: an eviction policy's (its ``from_record``), or None for the uncompressed model
    (transformers' dynamic cache holding the recorded keys and values). Returns (cache, reused, the
    float32 logits ``[1, V]`` of the prompt's last position).
    ``folder`` None: record in memory only (nothing shared).
    """
    from slimbench.methods.kvcache.policy import EvictionFactory, record_prefill

    key = key_of(lm, ids) if folder is not None else None
    record = load(key, folder) if key else None
    reused = record is not None
    if record is None:
        record = record_prefill(lm, ids)
        if key:
            store(key, record, folder)
    logits = record["tensors"]["logits"]
    if factory is None:
        return EvictionFactory.exact_from_record(lm, record), reused, logits
    return factory.from_record(lm, record), reused, logits
