"""Inference memory from a clean start: peak, split into runtime, weights, KV cache and the rest.

A reading is taken around one untimed generation (``clocks.PeakMemory``): ``start`` (resident
memory, or CUDA allocated bytes, just before) and ``peak`` (the highest during). What it means
depends on what else the process held, so every reading says where it was taken:

- ``fresh process``: a process forked from a server that never loaded a model holds only this
  one (reloaded from the artifact cache, or loaded and compressed there, then what that freed
  handed back), so everything it holds besides the model's tensors is its runtime: ``runtime``
  = ``start - weights`` (Python, torch, transformers, SlimBench, the tokenizer, the libraries
  loading imported); ``leftover`` is 0 by construction.
- ``engine process``: a model an engine runs in a process of its own (llama.cpp, vLLM): that
  process' resident set, all of it the engine's (runtime, weights, cache); no runtime split.
- ``same process``: beside whatever else the process holds (other models of an interleaved
  comparison, what compression left behind). ``runtime`` is what this process held just before
  it loaded its first model (:func:`note_runtime`), the nearest it has to a process holding only
  a model. (Until efficiency version 4 it was read after that load, minus the model's bytes; a
  model mapped from safetensors is not all resident then, which put the runtime at zero.)

The split (bytes; MiB in the metrics):

    leftover = max(0, start - runtime - weights)     held beyond the runtime and this model
    peak'    = peak - leftover   (same process: a process holding only this model would not hold it)
             = peak              (fresh process: measured as is; leftover is the loader's residue)
    other    = peak' - runtime - weights - kv        activations, allocator, residue

``clean`` says the reset before the reading was verified: ``leftover`` within ``tolerance`` =
max(32 MiB, 5% of runtime + weights). On CUDA the runtime is 0 (the allocator does not count
the context) and the same formulas hold.
"""

from __future__ import annotations

from typing import Any

import psutil

MIB = 2**20
TOLERANCE_MIN = 32 * MIB
TOLERANCE_FRACTION = 0.05

_RUNTIME: int | None = None


def note_runtime(model_bytes: int = 0) -> int:
    """This process' resident memory now minus ``model_bytes`` (the model it just loaded, nothing else
    yet), kept the first time only."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = max(0, psutil.Process().memory_info().rss - int(model_bytes))
    return _RUNTIME


def runtime_rss() -> int | None:
    """What :func:`note_runtime` kept (None if this process never noted it)."""
    return _RUNTIME


def tolerance(runtime: int, weights: int) -> int:
    return max(TOLERANCE_MIN, int(TOLERANCE_FRACTION * (runtime + weights)))


def split(reading: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """(bytes per part, the protocol to record) from a reading.

    ``reading``: ``peak``, ``start``, ``kind`` (process_rss | cuda_max_allocated | engine_process_rss),
    ``weights`` (or None), ``kv`` (``roofline.kv_cache_bytes``, or None), ``runtime`` (or None),
    ``isolation`` (fresh process | same process | engine process), ``loaded``.
    """
    peak, start = int(reading["peak"]), int(reading["start"])
    weights = int(reading["weights"] or 0)
    kv = int((reading.get("kv") or {}).get("physical", 0))
    cuda = reading.get("kind") == "cuda_max_allocated"
    runtime = 0 if cuda else reading.get("runtime")
    isolation = reading.get("isolation", "same process")
    if isolation == "fresh process" and not cuda:
        runtime = max(0, start - weights)  # all it holds beside the model
    proto: dict[str, Any] = {"isolation": isolation, "loaded": reading.get("loaded")}
    if isolation == "engine process":  # another process: its whole resident set is the engine's
        proto.update(clean=True, runtime_mb=None, leftover_mb=None, tolerance_mb=None,
                     note=f"the engine's own process: its resident set's peak over {reading.get('peak_covers')}")
        return {"peak": float(peak), "weights": float(weights), "kv": float(kv),
                "other": float(peak - weights - kv)}, proto
    if runtime is None:  # nothing known of the process before the model: no split beyond weights and KV
        proto.update(clean=False, runtime_mb=None, leftover_mb=None, tolerance_mb=None,
                     note="this process' memory before its first model is unknown: the peak includes whatever "
                          "else it held")
        parts = {"peak": float(peak), "weights": float(weights), "kv": float(kv),
                 "other": float(peak - weights - kv)}
        return parts, proto
    leftover = max(0, start - runtime - weights)
    tol = tolerance(runtime, weights)
    inference_peak = peak - leftover if isolation == "same process" else peak
    parts = {"peak": float(inference_peak), "runtime": float(runtime), "weights": float(weights), "kv": float(kv),
             "other": float(inference_peak - runtime - weights - kv), "leftover": float(leftover)}
    proto.update(clean=leftover <= tol, runtime_mb=runtime / MIB, leftover_mb=leftover / MIB, tolerance_mb=tol / MIB)
    if isolation == "same process":
        proto["note"] = (f"measured beside {leftover / MIB:.0f} MiB the process held for other work (other models, "
                         "compression state), left out of the peak")
    else:
        proto["note"] = "measured in a process that held only this model"
    return parts, proto
