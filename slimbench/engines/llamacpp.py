"""llama.cpp as an execution backend: a GGUF file run by llama.cpp in its own process.

``LlamaCppModel`` is the engine model (slimbench.engines.backend): ``lm.model`` becomes it and
every task runs through llama.cpp unchanged:

- ``forward(input_ids, cache=None, use_cache=False)`` -> logits of every position ``[B, T, V]``
  (llama.cpp's own logits of every token: quality through the engine, the perplexity task's
  path), handed over through a file in ``/dev/shm`` instead of the pipe.
- a prefill (``use_cache=True`` and no cache) computes only the last position's logits, as a
  deployment does (``[B, 1, V]``); a later call with the cache returns every new position's.
- ``LlamaCppCache`` stands for the sequences in llama.cpp's own KV cache (``crop(-n)`` removes
  positions); opening a new prefill invalidates older caches, which then refuse to be used.
- ``LlamaCppGenerator`` (``lm.generator``) decodes greedily with the argmax taken inside the
  engine, so each token crosses the pipe as one integer: what the efficiency task times.

Records name the engine (``engine_facts``): llama-cpp-python's and llama.cpp's versions, the
build (commit, compiler, CMake flags), llama.cpp's own system info (the SIMD it uses), threads,
KV-cache type, and the GGUF file with its manifest.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimbench.engines import llamacpp_build
from slimbench.engines.engine_process import EngineProcess

ENGINE = "llama.cpp"


def unavailable() -> str | None:
    """Why the llama.cpp engine cannot run here (the install or build command), or None."""
    return llamacpp_build.python_unavailable()


def python_executable() -> str:
    """The interpreter that runs llama-cpp-python (SlimBench's own); add ``llamacpp_build.lib_env()``."""
    return sys.executable


@dataclass
class LlamaCppOutput:
    logits: torch.Tensor
    cache: LlamaCppCache | None = None


class LlamaCppCache:
    """The rows' sequences in llama.cpp's KV cache (valid until the next prefill of the model)."""

    def __init__(self, model: LlamaCppModel, length: int, epoch: int, rows: int):
        self.model, self.length, self.epoch, self.rows = model, length, epoch, rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, tokens: int) -> None:
        keep = self.length + tokens if tokens < 0 else min(self.length, tokens)
        if keep != self.length:
            self.model._check(self)
            self.model.proc.request({"op": "crop", "keep": keep})
            self.length = keep


class LlamaCppModel(nn.Module):
    engine = ENGINE

    def __init__(self, gguf: Path, config, *, threads: int, n_ctx: int = 2048, n_seq: int = 1, n_batch: int = 512,
                 kv_type: str = "f16", parameters: int | None = None, manifest: dict | None = None,
                 timeout_s: float = 600.0, owned_dir: Path | None = None):
        super().__init__()
        self.gguf, self.config, self.threads, self.kv_type = Path(gguf), config, threads, kv_type
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.manifest = manifest or {}
        self.owned_dir = owned_dir
        self.logits_file = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()) / (
            f"slimbench-llamacpp-{uuid.uuid4().hex}.npy")
        payload = {"path": str(self.gguf), "threads": threads, "n_ctx": n_ctx, "n_seq": n_seq, "n_batch": n_batch,
                   "kv_type": kv_type, "logits_file": str(self.logits_file)}
        self.proc = EngineProcess("slimbench.engines.llamacpp_worker:open_engine", payload, name=ENGINE,
                                  timeout_s=timeout_s, env=llamacpp_build.lib_env())
        self.info = self.proc.info
        self.n_parameters = parameters or self.info["model_parameters"]
        self.epoch = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _check(self, cache: LlamaCppCache) -> None:
        if cache.model is not self or cache.epoch != self.epoch:
            raise RuntimeError("this llama.cpp cache belongs to an earlier prefill; its positions were overwritten")

    def _logits_file(self, shape) -> torch.Tensor:
        arr = np.load(self.logits_file, mmap_mode="r")
        out = torch.from_numpy(np.array(arr))  # a copy: the file is rewritten by the next call
        del arr
        return out.view(*shape)

    def forward(self, input_ids: torch.Tensor, cache: LlamaCppCache | None = None, use_cache: bool = False,
                logits_to_keep: int | None = None, **kwargs):
        extra = {k for k, v in kwargs.items() if v is not None and k not in ("return_dict", "attention_mask")}
        if extra:
            raise TypeError(f"the llama.cpp model takes input_ids, cache and use_cache only, not {sorted(extra)}")
        if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
            raise ValueError("the llama.cpp engine model takes unpadded rows (no attention mask)")
        rows = input_ids.detach().cpu().long().tolist()
        b, t = len(rows), len(rows[0])
        if cache is None:
            start = 0
            self.epoch += 1
        else:
            self._check(cache)
            start = cache.length
        last_only = logits_to_keep == 1 or (use_cache and cache is None)
        want = "last" if last_only else "all"
        reply = self.proc.request({"op": "eval", "rows": rows, "start": start, "logits": want})
        if last_only:
            logits = torch.frombuffer(bytearray(reply), dtype=torch.float32).view(b, 1, -1)
        else:
            logits = self._logits_file(reply)
        if not (use_cache or cache is not None):
            return LlamaCppOutput(logits)
        return LlamaCppOutput(logits, LlamaCppCache(self, start + t, self.epoch, b))

    def window_nll(self, windows: torch.Tensor) -> list[float]:
        """Per-window mean next-token NLL computed inside the engine (no logits cross the pipe)."""
        return self.proc.request({"op": "nll", "windows": windows.tolist()}, what="perplexity windows")

    def generate_native(self, ids: torch.Tensor, n: int) -> dict[str, Any]:
        """Greedy decoding entirely inside the engine, with a clock stamp per token."""
        return self.proc.request({"op": "generate", "rows": ids.tolist(), "n": n}, what="generation")

    def memory(self) -> dict[str, int]:
        return self.proc.request({"op": "memory"})

    def slimbench_size(self) -> dict[str, Any]:
        stored = self.gguf.stat().st_size
        linear = [t for t in self.manifest.get("tensors", []) if len(t["shape"]) == 2
                  and t["tensor"] not in ("token_embd.weight", "output.weight")]
        bits = None
        if linear:
            from slimbench.engines.export.gguf_export import type_bits

            numel = sum(t["shape"][0] * t["shape"][1] for t in linear)
            bits = sum(type_bits(t["type"]) * t["shape"][0] * t["shape"][1] for t in linear) / numel
        return {
            "parameters": self.n_parameters,
            "memory_bytes": self.info["model_bytes"],
            "stored_bytes": stored,
            "stored_format": f"gguf {self.manifest.get('file_type', '?')}",
            "effective_bits": bits,
            "bits_per_parameter": 8 * stored / self.n_parameters,
        }

    def slimbench_files(self) -> list[Path]:
        return [self.gguf]

    def close(self) -> None:
        self.proc.close()
        self.logits_file.unlink(missing_ok=True)
        if self.owned_dir is not None:
            import shutil

            shutil.rmtree(self.owned_dir, ignore_errors=True)


class LlamaCppGenerator:
    """Greedy decoding with the argmax inside the engine; one integer per row per step crosses."""

    def generate(self, lm, ids: torch.Tensor, n: int, on_tokens=None) -> torch.Tensor:
        model: LlamaCppModel = lm.model
        rows = ids.tolist()
        model.epoch += 1
        start = 0
        out = []
        for _ in range(n):
            nxt = model.proc.request({"op": "eval", "rows": rows, "start": start, "logits": "argmax"})
            out.append(nxt)
            if on_tokens is not None:
                on_tokens(1)
            start += len(rows[0])
            rows = [[x] for x in nxt]
        return torch.tensor(out, dtype=torch.long).t().contiguous()


def engine_facts(model: LlamaCppModel) -> dict[str, Any]:
    """What a record says about the engine that ran it."""
    info = model.info
    return {
        "engine": ENGINE,
        "llama_cpp_python": info["llama_cpp_python"],
        "llama_cpp": info["llama_cpp"],
        "build": llamacpp_build.build_info(),
        "system_info": info["system_info"],
        "threads": model.threads,
        "kv_cache_type": model.kv_type,
        "context_per_sequence": model.n_ctx,
        "sequences": model.n_seq,
        "format": {"file": model.gguf.name, "bytes": model.gguf.stat().st_size,
                   "manifest_summary": model.manifest.get("summary")},
    }
