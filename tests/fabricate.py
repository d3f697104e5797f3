"""Fabricated result records for report and compare tests (no model is run).

The records have the shape the runner writes (schema 1): efficiency version 1 (prefill,
decode tokens/s, peak memory) and version 2 (TTFT, inter-token percentiles, throughput,
memory split, KV bytes, roofline fractions, a regime and a `noisy` flag).
"""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

from slimbench.config import stable_hash

ENV = {
    "cpu": "Test CPU 9000",
    "gpu": None,
    "torch": "2.13.0+cpu",
    "torch_threads": 1,
    "python": "3.11.7",
    "git": {"commit": "0" * 40, "dirty": False},
}
HW = {"device": "cpu", "dtype": "float32", "threads": 1}
PPL_TASK = {
    "name": "perplexity",
    "version": "concat-windows/1",
    "params": {"corpus": "shakespeare", "split": "test", "seqlen": 64, "max_windows": 8, "batch_size": 1},
    "provider": None,
}


def method(name: str, params: dict[str, Any] | None = None, version: str = "1", label: str | None = None) -> dict:
    params = params or {}
    return {
        "name": name,
        "label": label or name,
        "params": params,
        "steps": [{"name": name, "params": params, "version": version, "provider": None}],
    }


def run_id(model: str, meth: dict, task: dict, hw: dict) -> str:
    return stable_hash({"model": model, "method": meth["steps"], "task": task, "hardware": hw})


def record(
    model: str,
    meth: dict,
    task: dict,
    metrics: dict,
    *,
    details: dict | None = None,
    execution: str = "native",
    report: dict | None = None,
    status: str = "ok",
    error: dict | None = None,
    hw: dict | None = None,
    env: dict | None = None,
    finished: str = "2026-11-01T10:00:00.000000Z",
) -> dict:
    hw = hw or HW
    rep = {
        "execution": execution,
        "stored_bytes": 13e6,
        "effective_bits": 32.0,
        "parameters": 3.3e6,
        "sparsity": 0.0,
        "compress_seconds": 0.1,
        "warnings": [],
        "steps": [],
    }
    rep.update(report or {})
    return {
        "schema": 1,
        "run_id": run_id(model, meth, task, hw),
        "suite": "fabricated.yaml",
        "model": {"name": model, "revision": None, "trust_remote_code": False, "provenance": None},
        "method": meth,
        "task": task,
        "hardware": hw,
        "environment": env or ENV,
        "status": status,
        "error": error,
        "metrics": metrics if status == "ok" else {},
        "task_details": details or {},
        "method_report": rep,
        "started_at": finished,
        "finished_at": finished,
    }


def m(value: float, unit: str, higher: bool, samples: list[float] | None = None) -> dict:
    out = {"value": value, "unit": unit, "higher_is_better": higher}
    if samples:
        out["samples"] = samples
    return out


def ppl_record(model: str, meth: dict, nll: list[float], **kw) -> dict:
    mean = sum(nll) / len(nll)
    details = {
        "protocol": "concat-windows",
        "windows": len(nll),
        "windows_available": 40,
        "tokens": 64 * len(nll),
        "window_nll": nll,
        "per_example": {"id": [str(i) for i in range(len(nll))], "nll": nll},
    }
    metrics = {"perplexity": m(math.exp(mean), "ppl", False), "nll": m(mean, "nats/token", False)}
    return record(model, meth, copy.deepcopy(PPL_TASK), metrics, details=details, **kw)


def eff_task(prompt: int, new: int, batch: int, version: str = "2") -> dict:
    return {
        "name": "efficiency",
        "version": version,
        "params": {
            "prompt_len": prompt,
            "new_tokens": new,
            "batch_size": batch,
            "repeats": 3,
            "warmup": 1,
            "corpus": "shakespeare",
            "split": "test",
        },
        "provider": None,
    }


def eff_v2(
    model: str, meth: dict, regime: tuple[int, int, int], speed: float, mem: float, *, noisy: bool = False, **kw
) -> dict:
    prompt, new, batch = regime
    itl = 2.0 / speed
    rng = random.Random(hash((model, json.dumps(meth), regime)) % 1000)
    samples = [itl * (1 + 0.02 * rng.uniform(-1, 1)) for _ in range(5)]
    metrics = {
        "ttft_ms": m(0.05 * prompt / speed, "ms", False),
        "prefill_ms": m(0.05 * prompt / speed, "ms", False),
        "itl_p50_ms": m(itl, "ms", False, samples),
        "itl_p90_ms": m(itl * 1.1, "ms", False),
        "itl_p99_ms": m(itl * 1.3, "ms", False),
        "decode_tokens_per_s": m(1e3 * batch / itl, "tokens/s", True),
        "e2e_tokens_per_s": m(0.9e3 * batch / itl, "tokens/s", True),
        "peak_memory_mb": m(mem + 2 * batch, "MiB", False),
        "memory_weights_mb": m(mem * 0.8, "MiB", False),
        "memory_kv_mb": m(0.01 * batch * (prompt + new), "MiB", False),
        "memory_other_mb": m(mem * 0.2, "MiB", False),
        "kv_cache_bytes_logical": m(1e4 * batch * (prompt + new), "bytes", False),
        "kv_cache_bytes_physical": m(1.2e4 * batch * (prompt + new), "bytes", False),
        "decode_roofline_fraction": m(0.3, "fraction", True),
        "prefill_roofline_fraction": m(0.2, "fraction", True),
    }
    details = {
        "regime": {"prompt_len": prompt, "new_tokens": new, "batch_size": batch},
        "noisy": noisy,
        "noise_reasons": ["spread of repeats 18% > 10%"] if noisy else [],
    }
    return record(model, meth, eff_task(*regime), metrics, details=details, **kw)


def eff_v1(model: str, meth: dict, tok_s: float, mem: float, **kw) -> dict:
    metrics = {
        "prefill_ms": m(4.0 * 540 / tok_s, "ms", False, [4.1, 3.9]),
        "decode_tokens_per_s": m(tok_s, "tokens/s", True, [tok_s * 0.99, tok_s * 1.01]),
        "peak_memory_mb": m(mem, "MiB", False),
    }
    return record(model, meth, eff_task(8, 2, 1, version="1"), metrics, details={"memory_kind": "process_rss"}, **kw)


REGIMES = [(128, 32, 1), (128, 32, 8), (2048, 32, 1)]
SCRIPT = "<script>alert(1)</script>"


def methods() -> dict[str, tuple[dict, str, float, float, dict]]:
    """label key -> (method record, execution, ppl shift, speed factor, method report extras)."""
    return {
        "baseline": (method("baseline"), "native", 0.0, 1.0, {}),
        "rtn4": (
            method("rtn", {"group_size": 32}, label="rtn(group_size=32)"),
            "simulated",
            0.08,
            0.98,
            {"stored_bytes": 3e6, "effective_bits": 4.6},
        ),
        "rtn8": (method("rtn", {"bits": 8}), "simulated", 0.005, 1.01, {"stored_bytes": 5e6, "effective_bits": 8.2}),
        "magnitude": (method("magnitude"), "simulated", 0.3, 0.99, {"sparsity": 0.5}),
        "gptq3": (
            method("gptq", {"bits": 3, "calib_samples": 4}),
            "simulated",
            0.6,
            1.0,
            {
                "stored_bytes": 2.6e6,
                "effective_bits": 3.1,
                "warnings": ["gptq: 1024 calibration tokens < 1536 inputs of down_proj: rank-deficient Hessian"],
            },
        ),
        "svd": (method("svd"), "native", 0.9, 1.25, {"stored_bytes": 10e6, "parameters": 2.6e6}),
        "cast": (method("cast"), "native", 0.001, 1.6, {"stored_bytes": 6.5e6, "effective_bits": 16.0}),
        "evil": (method("evil-plugin", {"x": SCRIPT}, label=SCRIPT), "native", 0.2, 1.1, {}),
    }


def suite_records(model: str = "tiny-llama", n: int = 8, seed: int = 0) -> list[dict]:
    """A full fabricated sweep: perplexity + efficiency v2 in three regimes for every method."""
    rng = random.Random(seed)
    base = [2.0 + 0.2 * rng.random() for _ in range(n)]
    out = []
    for key, (meth, execution, shift, speed, rep) in methods().items():
        nll = [b + shift + 0.01 * rng.uniform(-1, 1) * (key != "baseline") for b in base]
        out.append(ppl_record(model, meth, nll, execution=execution, report=rep))
        for reg in REGIMES:
            noisy = key == "cast" and reg[2] == 8
            out.append(
                eff_v2(
                    model,
                    meth,
                    reg,
                    speed,
                    50 * rep.get("stored_bytes", 13e6) / 13e6,
                    noisy=noisy,
                    execution=execution,
                    report=rep,
                )
            )
    return out


def write(store, recs: list[dict]) -> None:
    for r in recs:
        store.write(r)
