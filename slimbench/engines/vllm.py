"""vLLM as an execution backend: a Hugging Face folder run by vLLM (CPU build) in its own environment.

``VllmModel`` is the engine model (slimbench.engines.backend): ``lm.model`` becomes it. vLLM hands
out log-probabilities, never logits, so it meets the contract this way:

- ``token_nll(ids)``: the NLL of every token after the first, from vLLM's ``prompt_logprobs``
  (``LanguageModel.token_nll`` asks the engine for it): the perplexity task's path.
- a prefill (``use_cache=True``, no cache) returns ``[B, 1, V]`` holding the log-probabilities of
  vLLM's ``top_logprobs`` most likely next tokens and -inf elsewhere: the same argmax and the
  same normalised probabilities on those tokens, which is what greedy decoding and the timed
  prefill need. Every other call (all positions' logits, continuing a cache) is refused with
  the reason: tasks that need every logit (fidelity, multiple choice over logits) fail as a
  record, they do not get made-up numbers.
- ``VllmGenerator`` (``lm.generator``) decodes greedily in vLLM's own scheduler loop, one
  scheduler step per token, each token crossing the socket as one integer.

Records name the engine (``engine_facts``): vLLM's and its torch's versions, the CPU kernels it
uses, threads and the cores it binds, the exported folder and its manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimbench.engines import vllm_env
from slimbench.engines.engine_process import EngineProcess

ENGINE = "vLLM"
# Head sizes vLLM 0.32's CPU attention backend takes (CPUAttentionBackend.get_supported_head_sizes)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def unavailable() -> str | None:
    return vllm_env.unavailable()


def unsupported_format(manifest: dict) -> str | None:
    """Why vLLM's CPU build cannot run this export, found before vLLM starts (or None).

    vLLM 0.32 runs packed integer weights on CPU only through ``cpu_gemm_wna16`` (measured on tiny
    Llamas): its AVX-512 kernel build carries it and its AVX2 build does not (W4A16 fails in the
    first forward); it takes 4-bit codes only (8-bit packed weights find no kernel at load) and
    bf16/fp16 activations only (fp32 fails in the first forward: "not implemented for 'Float'").
    Its int8 W8A8 kernels (oneDNN) take activations quantized dynamically per token or statically
    per tensor; a dynamic per-tensor scheme matches none of its schemes and fails at load. On a CPU
    with AMX it routes int8 weights whose input width is a multiple of 32 to its AMX kernel
    (``int8_scaled_mm_with_quant``, chosen from the weights alone), which takes bf16/fp16
    activations only: fp32 fails in the first forward ("expect A to be bfloat16 or half")."""
    rows = manifest.get("tensors", [])
    int8 = [r for r in rows if r.get("from") == "int8"]
    if any(r.get("activations") != "token" for r in int8):
        return ("vLLM's int8 W8A8 kernels take activations quantized dynamically per token; this export "
                "quantizes them per tensor (naive w8a8, dynamic-int8): use smoothquant or w8a8 with "
                "act_granularity: per_token")
    # vLLM also asks for a whole 16-column tile of the (fused) output; the input width alone is the
    # conservative test, since fused q/k/v or gate/up share it.
    if (int8 and manifest.get("dtype") not in ("bfloat16", "float16") and torch.cpu._is_amx_tile_supported()
            and any(r["shape"][1] % 32 == 0 for r in int8)):
        return (f"on a CPU with AMX, vLLM runs int8 W8A8 weights through its AMX kernel, which takes bf16/fp16 "
                f"activations only, not {manifest.get('dtype')}: give the vllm step dtype: bfloat16")
    bits = sorted({r["type"].split()[0] for r in rows if r.get("from") == "grid"})
    if not bits:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return (f"vLLM's CPU kernels for packed integer weights (W4A16) need its AVX-512 build; this CPU "
                f"reports {capability}: run the quantized model through llama.cpp or OpenVINO, or dense through vLLM")
    if any(b != "int4" for b in bits):
        return (f"vLLM's CPU kernel for packed weights takes 4-bit codes only; this export packs {', '.join(bits)} "
                "(quantize to 4 bits, or run it through llama.cpp/OpenVINO)")
    if manifest.get("dtype") not in ("bfloat16", "float16"):
        return (f"vLLM's CPU kernel for packed 4-bit weights runs bf16/fp16 activations, not {manifest.get('dtype')}: "
                "give the vllm step dtype: bfloat16")
    return None


def bind_cpus(threads: int) -> str:
    """The cores vLLM binds its OpenMP threads to: the first ``threads`` this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise ValueError(f"vLLM asked for {threads} threads; this process may use {len(allowed)} cores")
    return ",".join(str(c) for c in allowed[:threads])


def dense_top(top: list[tuple[list[int], list[float]]], vocab: int) -> torch.Tensor:
    """``[B, 1, V]``: each row's top next-token log-probabilities in place, -inf elsewhere."""
    out = torch.full((len(top), 1, vocab), float("-inf"))
    for r, (ids, logprobs) in enumerate(top):
        out[r, 0, torch.tensor(ids, dtype=torch.long)] = torch.tensor(logprobs, dtype=torch.float32)
    return out


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header (nothing else is read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def effective_bits(folder: Path, manifest: dict) -> float | None:
    """Stored bits per weight of the linear layers (codes, scales and zero-points counted)."""
    sizes: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        sizes.update(safetensors_sizes(f))
    linear = [t for t in manifest.get("tensors", []) if len(t["shape"]) == 2
              and not t["tensor"].endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight"))]
    if not linear:
        return None
    numel = sum(t["shape"][0] * t["shape"][1] for t in linear)
    stored = 0
    for t in linear:
        module = t["tensor"].removesuffix(".weight") + "."
        stored += sum(b for k, b in sizes.items() if k.startswith(module))
    return 8 * stored / numel


@dataclass
class VllmOutput:
    logits: torch.Tensor
    cache: VllmCache | None = None


class VllmCache:
    """Stands for the rows vLLM prefilled; vLLM keeps its own paged cache and decodes in its own loop."""

    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, tokens: int) -> None:
        raise NotImplementedError("vLLM keeps its own KV cache: SlimBench cannot crop it")


class VllmModel(nn.Module):
    engine = ENGINE

    def __init__(self, folder: Path, config, *, dtype: str, threads: int, max_model_len: int, max_num_seqs: int,
                 top_logprobs: int, kv_cache_gib: int, parameters: int, manifest: dict | None = None,
                 timeout_s: float = 600.0, owned_dir: Path | None = None):
        super().__init__()
        self.folder, self.config, self.threads, self.compute_dtype = Path(folder), config, threads, dtype
        self.max_model_len, self.max_num_seqs, self.top_logprobs = max_model_len, max_num_seqs, top_logprobs
        self.manifest, self.owned_dir, self.n_parameters = manifest or {}, owned_dir, parameters
        self.cpus = bind_cpus(threads)
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in the worker: one step() is one step
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.cpus,
            "OMP_NUM_THREADS": str(threads),
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        }
        payload = {"path": str(self.folder), "dtype": dtype, "max_model_len": max_model_len,
                   "max_num_seqs": max_num_seqs, "max_logprobs": top_logprobs}
        self.proc = EngineProcess("slimbench.engines.vllm_worker:open_engine", payload, name=ENGINE,
                                  timeout_s=timeout_s, env=env, python=str(vllm_env.python()))
        self.info = self.proc.info

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)

    def _rows(self, input_ids: torch.Tensor) -> list[list[int]]:
        rows = input_ids.detach().cpu().long().tolist()
        if len(rows) > self.max_num_seqs:
            raise ValueError(f"batch of {len(rows)} rows; the vLLM engine was opened for {self.max_num_seqs}")
        return rows

    def forward(self, input_ids: torch.Tensor, cache: VllmCache | None = None, use_cache: bool = False,
                logits_to_keep: int | None = None, **kwargs):
        if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
            raise ValueError("the vLLM engine model takes unpadded rows (no attention mask)")
        if cache is not None:
            raise NotImplementedError("vLLM decodes in its own loop (lm.generator); SlimBench cannot continue its "
                                      "cache call by call")
        if not (use_cache or logits_to_keep == 1):
            raise NotImplementedError(
                "vLLM returns log-probabilities of chosen tokens, not the logits of every position; SlimBench asks "
                "it for per-token NLL (perplexity) and greedy decoding only, so this task cannot run through vLLM")
        rows = self._rows(input_ids)
        top = self.proc.request({"op": "prefill", "rows": rows}, what="prefill")
        out = dense_top(top, self.config.vocab_size)
        return VllmOutput(out, VllmCache(len(rows[0])) if use_cache else None)

    def token_nll(self, ids: torch.Tensor) -> torch.Tensor:
        nll = self.proc.request({"op": "token_nll", "rows": self._rows(ids)}, what="prompt log-probabilities")
        return torch.tensor(nll, dtype=torch.float64)

    def window_nll(self, windows: torch.Tensor) -> list[float]:
        return [float(r.mean()) for r in self.token_nll(windows)]

    def generate_native(self, ids: torch.Tensor, n: int) -> dict[str, Any]:
        """Greedy decoding inside the engine with a clock stamp per scheduler step (engine-bench)."""
        return self.proc.request({"op": "generate", "rows": self._rows(ids), "n": n}, what="generation")

    def memory(self) -> dict[str, int]:
        return self.proc.request({"op": "memory"})

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))

    def decode_bytes(self) -> int:
        """Bytes one decode step reads: every stored tensor once, the input embedding's gather left
        out unless it is also the output projection (tied)."""
        sizes: dict[str, int] = {}
        for f in self.folder.glob("*.safetensors"):
            sizes.update(safetensors_sizes(f))
        tied = not any(k.endswith("lm_head.weight") for k in sizes)
        return sum(b for k, b in sizes.items() if tied or not k.endswith("embed_tokens.weight"))

    def slimbench_size(self) -> dict[str, Any]:
        stored = self.stored_bytes()
        return {
            "parameters": self.n_parameters,
            "memory_bytes": self.info.get("weight_bytes") or stored,
            "stored_bytes": stored,
            "stored_format": f"compressed-tensors {self.manifest.get('quantization_format', '?')}",
            "effective_bits": effective_bits(self.folder, self.manifest),
            "bits_per_parameter": 8 * stored / self.n_parameters,
        }

    def slimbench_files(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors"))

    def close(self) -> None:
        self.proc.close()
        if self.owned_dir is not None:
            import shutil

            shutil.rmtree(self.owned_dir, ignore_errors=True)


class VllmGenerator:
    """Greedy decoding in vLLM's scheduler loop; one integer per row per step crosses the socket."""

    def generate(self, lm, ids: torch.Tensor, n: int, on_tokens=None) -> torch.Tensor:
        model: VllmModel = lm.model
        rows = model._rows(ids)
        out = [model.proc.request({"op": "start", "rows": rows, "n": n}, what="prefill and first token")]
        if on_tokens is not None:
            on_tokens(1)
        for _ in range(n - 1):
            out.append(model.proc.request({"op": "step"}, what="a decode step"))
            if on_tokens is not None:
                on_tokens(1)
        return torch.tensor(out, dtype=torch.long).t().contiguous()


def engine_facts(model: VllmModel) -> dict[str, Any]:
    info = model.info
    return {
        "engine": ENGINE,
        "vllm": info["vllm"],
        "torch_in_engine": info["torch"],
        "cpu_kernels": info["cpu_capability"],
        "environment": str(vllm_env.env_dir()),
        "threads": model.threads,
        "bound_cpus": model.cpus,
        "dtype": model.compute_dtype,
        "max_model_len": model.max_model_len,
        "sequences": model.max_num_seqs,
        "top_logprobs": model.top_logprobs,
        "load_seconds": info["load_seconds"],
        "format": {"folder": model.folder.name, "bytes": model.stored_bytes(),
                   "manifest_summary": model.manifest.get("summary")},
    }
