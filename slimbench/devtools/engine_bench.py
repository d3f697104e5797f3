"""The engine bench: engines x formats x methods on one model, quality and speed, interleaved.

Each path is a method chain (torch eager, a cast, a SlimBench quantizer then ``llama-cpp``,
``llamacpp-quant``, ``openvino``, ``nncf-weights``, ...) built on a fresh copy of the model; all
paths stay alive together so the timed repeats alternate (A B C, C B A, ...).

Per path:
- quality, measured for real: perplexity on the same windows of the ``perplexity`` protocol
  (concat-windows, test split) through the path's own logits (the engine's, for an engine), and
  its in-process counterpart where the path is an engine (the agreement).
- speed, batch 1: ``prefill`` (one prompt of ``prompt_len`` tokens, the last position's logits)
  and ``decode`` (``new_tokens`` greedy tokens through ``lm.generate``, tokens after the first over
  the time from the first to the last); llama.cpp also through its in-engine loop (no pipe per
  token). Medians over ``repeats``.
- memory: an engine in its own process reports its peak resident set; in-process paths report
  the bytes of their weights (the process holds every path at once).
- roofline: bytes one decode step reads (every weight matrix once; the embedding gather
  excluded unless it is also the output projection) over the machine's measured bandwidth
  gives the most tokens/s memory traffic allows; ``roofline`` is measured / that.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

SMOL = "dequantized from Q4_1 (its published GGUF)"
NOTES = {"smollm2-135m": SMOL, "gemma3-270m": "dequantized from Q4_K_M (its published GGUF)"}
AGREE = {"check_windows": 8, "check_seqlen": 512}
PATHS: dict[str, list[Any]] = {
    "torch-fp32": ["baseline"],
    "torch-bf16": [{"name": "cast", "dtype": "bfloat16"}],
    "llama-f16": [{"name": "llama-cpp", "weights": "F16", "embeddings": "F16"}],
    "llama-auto": [{"name": "llama-cpp"}],
    "llama-q8_0": [{"name": "llamacpp-quant", "type": "Q8_0", "imatrix": "none"}],
    "llama-q6_k": [{"name": "llamacpp-quant", "type": "Q6_K", "calib_samples": 16}],
    "llama-q4_k_m": [{"name": "llamacpp-quant", "type": "Q4_K_M", "calib_samples": 16}],
    "llama-q4_0": [{"name": "llamacpp-quant", "type": "Q4_0", "calib_samples": 16}],
    "llama-iq4_xs": [{"name": "llamacpp-quant", "type": "IQ4_XS", "calib_samples": 16}],
    "llama-q3_k_m": [{"name": "llamacpp-quant", "type": "Q3_K_M", "calib_samples": 16}],
    "llama-q2_k": [{"name": "llamacpp-quant", "type": "Q2_K", "calib_samples": 16}],
    "rtn4g32-llama": [{"name": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, {"name": "llama-cpp"}],
    "gptq4g32-llama": [{"name": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "calib_samples": 32},
                       {"name": "llama-cpp"}],
    "ov-fp32": [{"name": "openvino"}],
    "ov-int8": [{"name": "nncf-weights", "mode": "int8_asym"}],
    "ov-int4": [{"name": "nncf-weights", "mode": "int4_asym", "group_size": 64}],
    "ov-int4-g32": [{"name": "nncf-weights", "mode": "int4_asym", "group_size": 32}],
    # SlimBench's own grids in OpenVINO's compressed-weight kernels (u4 codes, zero-points, fp16
    # scales; OpenVINO's default int8 dynamic quantization of their activations, or off: -wo)
    "rtn4g32-ov": [{"name": "rtn", "bits": 4, "group_size": 32}, {"name": "openvino"}],
    "rtn4g32-ov-wo": [{"name": "rtn", "bits": 4, "group_size": 32}, {"name": "openvino", "dynamic_quantization": 0}],
    "gptq4g32-ov": [{"name": "gptq", "bits": 4, "group_size": 32, "calib_samples": 32}, {"name": "openvino"}],
    "vllm-fp32": [{"name": "vllm"}],
    "vllm-bf16": [{"name": "vllm", "dtype": "bfloat16"}],
    # packed 4-bit weights in vLLM (compressed-tensors W4A16, bf16 activations: its AVX-512 CPU kernel).
    # Asymmetric groups of 32 like SmolLM2's Q4_1, but with integer zero-points (Q4_1 keeps a float
    # minimum), so RTN does not find the published grid again as llama-auto does
    "rtn4g32-vllm": [{"name": "rtn", "bits": 4, "group_size": 32}, {"name": "vllm", "dtype": "bfloat16"}],
    # SmoothQuant W8A8 (int8 weights, per-token dynamic int8 activations): in process through
    # torch._int_mm, and written int-quantized into vLLM's own int8 GEMM (oneDNN)
    "sq-w8a8-torch": [{"name": "smoothquant", "calib_samples": 16}],
    "sq-w8a8-vllm": [{"name": "smoothquant", "calib_samples": 16}, {"name": "vllm"}],
    "sq-w8a8-vllm-bf16": [{"name": "smoothquant", "calib_samples": 16}, {"name": "vllm", "dtype": "bfloat16"}],
}
NATIVE_LOOP = ("llama.cpp", "vLLM")  # engines that also time decoding inside their own process
DEFAULT = "torch-fp32,torch-bf16,llama-f16,llama-auto,llama-q8_0,llama-q4_k_m,llama-q4_0,ov-fp32,ov-int8"


def with_agreement(steps: list[Any], windows: int, seqlen: int) -> list[Any]:
    """Engine steps score the bench's own windows (their agreement check is the quality figure)."""
    out = []
    for s in steps:
        if isinstance(s, dict) and s["name"] in ("llama-cpp", "llamacpp-quant", "openvino", "nncf-weights", "vllm"):
            s = {**s, "check_windows": windows, "check_seqlen": seqlen}
        out.append(s)
    return out


def bytes_per_decode_step(lm) -> int:
    """What one decode step reads: each weight matrix once (see the module docstring)."""
    model = lm.model
    if hasattr(model, "decode_bytes"):  # vLLM: its safetensors' real bytes
        return model.decode_bytes()
    tensors = getattr(model, "manifest", {}).get("tensors")
    if tensors:  # a GGUF: its tensors' real bytes
        from slimbench.engines.export.gguf_export import type_bits

        total = 0
        names = {t["tensor"] for t in tensors}
        for t in tensors:
            if len(t["shape"]) != 2 or (t["tensor"] == "token_embd.weight" and "output.weight" in names):
                continue
            total += t.get("bytes") or int(type_bits(t["type"]) * t["shape"][0] * t["shape"][1] / 8)
        return total
    if hasattr(model, "slimbench_size"):
        return int(model.slimbench_size()["memory_bytes"])
    from slimbench.measure.roofline import weight_bytes_read_per_step

    return weight_bytes_read_per_step(model)


def quality(lm, report: dict[str, Any], win: torch.Tensor) -> dict[str, Any]:
    for step in report["steps"]:
        if "agreement" in step["details"]:
            a = step["details"]["agreement"]
            return {"perplexity": a["perplexity_engine"], "perplexity_in_process": a["perplexity_in_process"],
                    "delta_nll": a["delta_nll"]}
    nll = [float(lm.token_nll(w[None]).double().mean()) for w in win]
    return {"perplexity": math.exp(sum(nll) / len(nll)), "perplexity_in_process": None, "delta_nll": None}


def sample(lm, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """One timed repeat: a prefill, then a greedy generation with a clock read per token."""
    t0 = time.perf_counter()
    lm.prefill(ids, capacity=ids.shape[1] + new_tokens)
    prefill_s = time.perf_counter() - t0
    stamps: list[float] = []
    lm.generate(ids, new_tokens, lambda k: stamps.append(time.perf_counter()))
    out = {"prefill_tokens_per_s": ids.shape[1] / prefill_s,
           "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}
    if getattr(lm.model, "engine", None) in NATIVE_LOOP:
        native = lm.model.generate_native(ids, new_tokens)
        s = native["stamps_ns"]
        out["native_decode_tokens_per_s"] = (len(s) - 1) / ((s[-1] - s[0]) / 1e9)
        out["native_ttft_ms"] = (s[0] - native["start_ns"]) / 1e6
    return out


def memory(lm) -> dict[str, Any]:
    model = lm.model
    if getattr(model, "engine", None) in NATIVE_LOOP:
        # the engine's resident memory once loaded (model, KV cache, buffers) is the deployment figure;
        # its later peak includes the agreement scoring's full-vocabulary logits
        return {"engine_peak_rss_mb": model.info["peak_rss_bytes"] / 2**20, "where": "engine process, loaded",
                "engine_peak_rss_after_scoring_mb": model.memory()["peak_rss_bytes"] / 2**20}
    if hasattr(model, "slimbench_size"):
        return {"weights_mb": model.slimbench_size()["memory_bytes"] / 2**20, "where": "in process"}
    from slimbench.modeling import memory_bytes

    return {"weights_mb": memory_bytes(model) / 2**20, "where": "in process"}


def summarize(samples: list[dict[str, float]]) -> dict[str, Any]:
    keys = samples[0].keys()
    return {k: {"median": statistics.median(s[k] for s in samples), "samples": [s[k] for s in samples]}
            for k in keys}


def run_model(model: str, paths: list[tuple[str, Any]], *, threads: int, prompt_len: int, new_tokens: int,
              repeats: int, windows: int, seqlen: int, log=print) -> dict[str, Any]:
    from slimbench.measure.limits import limits_summary, machine_limits, problems
    from slimbench.method import apply_method
    from slimbench.specs import HardwareSpec, ModelSpec
    from slimbench.tasks.perplexity import JOIN
    from slimbench.tasks.perplexity import windows as cut
    from slimbench.zoo.corpora import encode_split
    from slimbench.zoo.models import resolve

    hw = HardwareSpec(threads=threads)
    torch.set_num_threads(threads)
    spec = ModelSpec(name=model)
    built = []
    try:
        for label, mspec in paths:
            lm = resolve(spec, source="engine-bench", field="--models")(spec, hw)
            lm.spec = spec
            t0 = time.perf_counter()
            try:
                report = apply_method(lm, mspec, hw)
            except Exception as exc:  # one path failing is a row saying why, not a lost bench
                log(f"{model} {label}: FAILED {type(exc).__name__}: {exc}"[:500])
                built.append({"label": label, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                continue
            win = cut(encode_split(lm, "shakespeare", "test", JOIN), seqlen, windows)
            row = {"label": label, "lm": lm, "report": report, "build_s": time.perf_counter() - t0,
                   "quality": quality(lm, report, win), "bytes_per_token": bytes_per_decode_step(lm), "samples": []}
            q = row["quality"]
            # the quality figures are final here: a run stopped before its timed repeats keeps them in the log
            log(f"{model} {label}: built in {row['build_s']:.0f} s, perplexity {q['perplexity']:.3f}"
                + (f" (in process {q['perplexity_in_process']:.3f}, delta NLL {q['delta_nll']:+.2e})"
                   if q["delta_nll"] is not None else "")
                + f", stored {report.get('stored_bytes') or 0:,} bytes, effective bits {report.get('effective_bits')}")
            built.append(row)
        live = [r for r in built if "lm" in r]
        ids = torch.tensor([encode_split(live[0]["lm"], "shakespeare", "test", JOIN)[:prompt_len]])
        for r in live:  # warm-up, untimed
            sample(r["lm"], ids, new_tokens)
        load_before = _load()
        for rep in range(repeats):
            for r in live if rep % 2 == 0 else reversed(live):
                r["samples"].append(sample(r["lm"], ids, new_tokens))
        load_after = _load()
        limits = machine_limits(threads)
        bandwidth = limits["bandwidth"]["bytes_per_s"]
        rows = []
        for r in built:
            if "lm" not in r:
                rows.append(r)
                continue
            speed = summarize(r["samples"])
            ceiling = bandwidth / r["bytes_per_token"]
            best = speed.get("native_decode_tokens_per_s", speed["decode_tokens_per_s"])["median"]
            report = r["report"]
            rows.append({
                "label": r["label"], "method": report.get("label") or [s["name"] for s in report["steps"]],
                "steps": [{k: s.get(k) for k in ("name", "execution")} for s in report["steps"]],
                "engine": _engine_of(r["lm"]), "quality": r["quality"], "speed": speed, "memory": memory(r["lm"]),
                "bytes_per_token": r["bytes_per_token"], "roofline_tokens_per_s": ceiling,
                "roofline_fraction": best / ceiling, "stored_bytes": report.get("stored_bytes"),
                "effective_bits": report.get("effective_bits"), "build_s": r["build_s"],
                "format": _format_of(report),
            })
        return {"model": model, "weights_note": NOTES.get(model), "threads": threads, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "repeats": repeats, "windows": windows, "seqlen": seqlen,
                "bandwidth_bytes_per_s": bandwidth, "limits": limits_summary(limits),
                "limits_problems": problems(limits), "load_before": load_before, "load_after": load_after,
                "rows": rows}
    finally:
        for r in built:
            close = getattr(getattr(r.get("lm"), "model", None), "close", None)
            if close is not None:
                close()


def _load() -> list[float]:
    import os

    return list(os.getloadavg())


def _engine_of(lm) -> str:
    return getattr(lm.model, "engine", None) or f"torch {str(next(lm.model.parameters()).dtype)[6:]}"


def _format_of(report: dict[str, Any]) -> str | None:
    for step in report["steps"]:
        d = step["details"]
        export = d.get("export") or {}
        if export.get("format") == "compressed-tensors":  # vLLM's folder
            return f"compressed-tensors {export['quantization_format']} {export['dtype']}"
        if "file_type" in export:
            return f"gguf {export['file_type']}"
        if "type" in d and "tensor_types" in d:
            return f"gguf {d['type']}"
        if d.get("engine") == "openvino":
            return d.get("format")
    return None
