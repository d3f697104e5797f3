"""The llama.cpp side of the llama.cpp engine: runs in its own process (engine_process), no torch.

Talks to llama.cpp through llama-cpp-python's low-level C bindings (``llama_decode`` on a
batch, ``llama_get_logits``), not its high-level ``Llama`` class, so every token's logits can
be asked for (quality through the engine) or only the last one's (what a deployment computes).
Rows of a batch are llama.cpp sequences 0..B-1 of one context (its own KV cache per sequence).

Requests (``handle``):
- ``eval``: ``rows`` (B lists of token ids of equal length) at position ``start`` (0 clears the
  cache first); ``logits``: ``all`` (written to the shared file, [B, T, V] float32), ``last``
  ([B, V], returned) or ``argmax`` (the greedy next token of each row, returned).
- ``nll``: per-window mean next-token NLL of ``windows`` (the engine's own logits, float64 sums).
- ``generate``: greedy decoding of ``n`` tokens after ``rows`` inside the engine, with a
  ``perf_counter_ns`` stamp per token (CLOCK_MONOTONIC, comparable across processes).
- ``crop``: keep the first ``keep`` positions of every sequence. ``memory``: peak/current RSS.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import numpy as np

from slimbench.engines.engine_process import peak_rss_bytes

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}


class LlamaCppState:
    def __init__(self, payload: dict[str, Any]):
        import llama_cpp as L

        self.L = L
        self._log_cb = L.llama_log_callback(lambda level, text, data: None)  # keep a reference: C holds it
        L.llama_log_set(self._log_cb, ctypes.c_void_p())
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(payload["path"].encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {payload['path']}")
        self.n_seq, self.n_batch = payload["n_seq"], payload["n_batch"]
        cp = L.llama_context_default_params()
        cp.n_ctx = payload["n_ctx"] * self.n_seq
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.n_seq
        cp.n_threads = cp.n_threads_batch = payload["threads"]
        cp.type_k = cp.type_v = KV_TYPES[payload["kv_type"]]
        if payload["kv_type"] not in ("f16", "f32"):
            cp.flash_attn_type = 1  # llama.cpp needs flash attention for a quantized V cache
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, self.n_seq)
        self.logits_file = payload["logits_file"]
        self.kv_type = payload["kv_type"]

    def info(self) -> dict[str, Any]:
        L = self.L
        return {
            "pid": os.getpid(),
            "n_vocab": self.vocab,
            "llama_cpp_python": L.__version__,
            "llama_cpp": L.llama_version().decode() if hasattr(L, "llama_version") else "?",
            "system_info": L.llama_print_system_info().decode().strip(),
            "model_bytes": int(L.llama_model_size(self.model)),
            "model_parameters": int(L.llama_model_n_params(self.model)),
            "n_ctx": int(L.llama_n_ctx(self.ctx)),
            "kv_type": self.kv_type,
            **peak_rss_bytes(),
        }

    # -- decoding ---------------------------------------------------------------------------------
    def _decode(self, rows: list[list[int]], start: int, want: str) -> np.ndarray:
        """Feed ``rows`` (equal lengths) at ``start``; return the wanted logits ([n_out, V] float32)."""
        L, b = self.L, self.batch
        if len(rows) > self.n_seq:
            raise ValueError(f"batch of {len(rows)} rows; the engine was opened for {self.n_seq} sequences")
        if start == 0:
            L.llama_memory_clear(self.mem, True)
        t = len(rows[0])
        flat = [(r, i, tok) for r, row in enumerate(rows) for i, tok in enumerate(row)]
        outs = []
        for c0 in range(0, len(flat), self.n_batch):
            chunk = flat[c0 : c0 + self.n_batch]
            n_out = 0
            for j, (r, i, tok) in enumerate(chunk):
                b.token[j], b.pos[j], b.n_seq_id[j] = tok, start + i, 1
                b.seq_id[j][0] = r
                flag = want == "all" or i == t - 1
                b.logits[j] = 1 if flag else 0
                n_out += flag
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (1: no KV slot; the context holds {self.n_seq} x "
                                   f"{L.llama_n_ctx(self.ctx) // self.n_seq} positions)")
            if n_out:
                ptr = L.llama_get_logits(self.ctx)
                outs.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab)).copy())
        return np.concatenate(outs) if outs else np.zeros((0, self.vocab), np.float32)

    def handle(self, req: dict[str, Any]) -> Any:
        op = req["op"]
        if op == "eval":
            rows, want = req["rows"], req["logits"]
            logits = self._decode(rows, req["start"], "all" if want == "all" else "last")
            if want == "argmax":
                return logits.argmax(-1).tolist()
            if want == "last":
                return logits.tobytes()
            out = np.lib.format.open_memmap(self.logits_file, mode="w+", dtype=np.float32,
                                            shape=(len(rows), len(rows[0]), self.vocab))
            out[:] = logits.reshape(out.shape)
            out.flush()
            del out
            return list((len(rows), len(rows[0]), self.vocab))
        if op == "nll":
            return [self._window_nll(w) for w in req["windows"]]
        if op == "generate":
            return self._generate(req["rows"], req["n"])
        if op == "crop":
            for s in range(self.n_seq):
                self.L.llama_memory_seq_rm(self.mem, s, req["keep"], -1)
            return None
        if op == "memory":
            return peak_rss_bytes()
        raise ValueError(f"unknown request {op!r}")

    def _window_nll(self, ids: list[int]) -> float:
        logits = self._decode([ids], 0, "all")[:-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
        return float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).mean())

    def _generate(self, rows: list[list[int]], n: int) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        nxt = self._decode(rows, 0, "last").argmax(-1)
        stamps, tokens = [time.perf_counter_ns()], [nxt.tolist()]
        pos = len(rows[0])
        for _ in range(n - 1):
            nxt = self._decode([[int(x)] for x in nxt], pos, "last").argmax(-1)
            pos += 1
            stamps.append(time.perf_counter_ns())
            tokens.append(nxt.tolist())
        return {"start_ns": t0, "stamps_ns": stamps, "tokens": tokens}

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def open_engine(payload: dict[str, Any]) -> LlamaCppState:
    return LlamaCppState(payload)


FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_0": 2, "Q3_K_M": 12, "Q2_K": 10, "IQ4_XS": 30}


class QuantizeJob:
    """``llama_model_quantize`` (what llama-quantize calls) on ``payload``'s files, in this process.

    ``imatrix`` ({GGUF tensor name: per-input-column mean of squared inputs}) is handed to
    llama.cpp as ``llama_model_imatrix_data`` entries, the form llama-quantize builds from an
    imatrix file (its sums divided by its counts)."""

    def __init__(self, payload: dict[str, Any]):
        import llama_cpp as L

        self._log_cb = L.llama_log_callback(lambda level, text, data: None)
        L.llama_log_set(self._log_cb, ctypes.c_void_p())
        L.llama_backend_init()
        params = L.llama_model_quantize_default_params()
        params.nthread = payload["threads"]
        params.ftype = FTYPES[payload["type"]]
        keep = []
        imatrix = payload.get("imatrix") or {}
        if imatrix:
            entries = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
            for i, (name, values) in enumerate(imatrix.items()):
                arr = np.ascontiguousarray(values, dtype=np.float32)
                keep.append(arr)
                entries[i].name = name.encode()
                entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                entries[i].size = arr.size
            entries[len(imatrix)].name = None
            params.imatrix = ctypes.cast(entries, ctypes.POINTER(L.llama_model_imatrix_data))
            keep.append(entries)
        t0 = time.perf_counter()
        rc = L.llama_model_quantize(payload["src"].encode(), payload["dst"].encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc} for type {payload['type']}")
        self.result = {"seconds": time.perf_counter() - t0, "imatrix_entries": len(imatrix),
                       "llama_cpp": L.llama_version().decode() if hasattr(L, "llama_version") else "?"}

    def info(self) -> dict[str, Any]:
        return self.result

    def handle(self, req: dict[str, Any]) -> Any:
        raise ValueError("a quantize job answers no requests")


def quantize_file(payload: dict[str, Any]) -> QuantizeJob:
    return QuantizeJob(payload)
