"""Which server serves a cell, and building it: transformers (in process), llama.cpp, vLLM (processes).

- ``transformers``: any model SlimBench holds as a transformers model, compressed in memory
  (slimbench.engines.serving.hosted).
- ``llama.cpp``: llama-cpp-python's OpenAI server (``python -m llama_cpp.server``) on a GGUF
  file: the cell's model exported by slimbench.engines.export.gguf_export (``gguf_weights``:
  ``auto`` writes each tensor in the smallest block type that reproduces it bit for bit, else
  F16; the export's manifest, what was exact and what was approximated, goes into the record),
  or the GGUF an engine model already holds (``serving_files()``).
- ``vllm``: vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) on a folder,
  from vLLM's own environment.

``auto``: the engine the model already runs in if it names one (``lm.model.serving_engine``),
else ``transformers``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from slimbench.engines.serving import hosted
from slimbench.engines.serving.process import ServerProcess
from slimbench.engines.workers import free_loopback_port

SERVERS = ("transformers", "llama.cpp", "vllm")


def engine_of(lm: Any) -> str | None:
    """The server an engine model asks for (``serving_engine``), None for a transformers model."""
    return getattr(lm.model, "serving_engine", None)


def llama_cpp_python() -> str | None:
    """A Python that runs ``llama_cpp.server`` ($SLIMBENCH_LLAMA_CPP_PYTHON, else this one if it has it)."""
    exe = os.environ.get("SLIMBENCH_LLAMA_CPP_PYTHON")
    if exe:
        return exe if Path(exe).exists() else None
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("sse_starlette"):
        return sys.executable
    return None


def vllm_python() -> str | None:
    exe = os.environ.get("SLIMBENCH_VLLM_PYTHON")
    return exe if exe and Path(exe).exists() else None


def choose(lm: Any, wanted: str) -> str:
    """The server for this cell, or ``ValueError`` saying why it cannot be served as asked."""
    engine = engine_of(lm)
    name = wanted if wanted != "auto" else (engine or "transformers")
    if name == "transformers":
        why = hosted.unavailable() or hosted.unsupported(lm)
        if why:
            raise ValueError(f"serving with transformers: {why}")
    elif name == "llama.cpp":
        if llama_cpp_python() is None:
            raise ValueError("serving with llama.cpp needs llama-cpp-python with its server extra "
                             "(pip install 'llama-cpp-python[server]'), or SLIMBENCH_LLAMA_CPP_PYTHON naming a Python "
                             "that has it")
        if engine not in (None, "llama.cpp"):
            raise ValueError(f"the model runs in {engine}; llama.cpp serves GGUF files")
    elif name == "vllm":
        if vllm_python() is None:
            raise ValueError("serving with vLLM needs vLLM's own environment: set SLIMBENCH_VLLM_PYTHON to its Python "
                             "(a GPU machine; vLLM's CPU build cannot share SlimBench's pins)")
        if engine != "vllm":
            raise ValueError("vLLM serves a saved folder: export the model for vLLM first (a vLLM engine step)")
    return name


def request_extras(name: str, lm: Any) -> dict[str, Any] | None:
    """Fields every request carries for this server (beyond what GuideLLM sends)."""
    if name == "llama.cpp":
        # llama-cpp-python ignores ``ignore_eos``: ban the end-of-text token so every request
        # generates the length it asks for, as on the other servers
        eos = getattr(lm.tokenizer, "eos_token_id", None)
        return {"logit_bias": {str(eos): -100.0}} if eos is not None else None
    return None


def describe(name: str, lm: Any) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"transformers": "transformers", "llama.cpp": "llama_cpp_python", "vllm": "vllm"}[name]
    try:
        return {"version": version(dist)}
    except PackageNotFoundError:
        return {"version": None}


def gguf_for(lm: Any, cfg: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    """The GGUF file llama.cpp serves, and what it is (the export manifest's summary)."""
    files = getattr(lm.model, "serving_files", None)
    if callable(files):
        path = Path(files()[0])
        return path, {"source": "the engine's file", "file": path.name, "bytes": path.stat().st_size}
    from slimbench.engines.export import gguf_export

    path = work / "model.gguf"
    manifest = gguf_export.export(lm, path, weights=cfg.gguf_weights)
    return path, {"source": "exported for this cell", "file_type": manifest["file_type"],
                  "bytes": path.stat().st_size, "summary": manifest["summary"]}


def build(name: str, lm: Any, cfg: Any, ctx: Any, work: Path) -> Any:
    """The server object (not started): ``start``, ``stop``, ``alive``, ``url``, ``cpu_seconds``, ..."""
    port = free_loopback_port()
    threads = cfg.server_threads or ctx.hardware.threads or 1
    if name == "transformers":
        return hosted.HostedTransformersServer(lm, port, continuous_batching=cfg.continuous_batching,
                                               kv_tokens=cfg.kv_tokens, max_batch_tokens=cfg.max_batch_tokens,
                                               cpus=cfg.server_cpus)
    if name == "llama.cpp":
        gguf, what = gguf_for(lm, cfg, work)
        n_ctx = cfg.max_prompt_tokens + cfg.max_output_tokens + 16
        cmd = [llama_cpp_python(), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "slimbench",
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
        server = ServerProcess("llama.cpp", cmd, port, work / "server.log", env=_child_env(threads),
                               cpus=cfg.server_cpus)
        server.settings = {"gguf": what, "threads": threads, "n_ctx": n_ctx}
        return server
    model_dir = Path(lm.model.serving_files()[0])
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "slimbench", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(cfg.max_prompt_tokens + cfg.max_output_tokens + 16), "--disable-log-requests"]
    server = ServerProcess("vLLM", cmd, port, work / "server.log", env=_child_env(threads), cpus=cfg.server_cpus)
    server.settings = {"model_dir": str(model_dir)}
    return server


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env
