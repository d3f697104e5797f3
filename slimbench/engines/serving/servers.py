"""Which server serves a cell, and building it: transformers (in process), llama.cpp, vLLM (processes).

- ``transformers``: any model SlimBench holds as a transformers model, compressed in memory
  (slimbench.engines.serving.hosted).
- ``llama.cpp``: llama.cpp's own ``llama-server`` (``llama_server: native``: continuous
  batching over ``slots`` parallel sequences) or llama-cpp-python's OpenAI server
  (``python``: one request at a time), on a GGUF file: the one a ``llama-cpp`` method step
  exported (``lm.model.gguf``), else the cell's model exported here by
  slimbench.engines.export.gguf_export (``gguf_weights``; the manifest's summary, what was exact
  and what was approximated, goes into the record).
- ``vllm``: vLLM's OpenAI server on the vLLM step's exported folder, from vLLM's own environment
  (the CPU build SlimBench builds, slimbench.engines.vllm_env; or ``SLIMBENCH_VLLM_PYTHON``).

``auto``: the engine the model already runs in (``lm.model.engine``), else ``transformers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slimbench.engines.serving import hosted
from slimbench.engines.serving.process import ServerProcess
from slimbench.engines.workers import free_loopback_port

SERVERS = ("transformers", "llama.cpp", "vllm")


def engine_of(lm: Any) -> str | None:
    """The engine an engine model runs in (``lm.model.engine``), None for a transformers model."""
    return getattr(lm.model, "engine", None)


def llama_server_path() -> Path | None:
    from slimbench.engines import llamacpp_build

    return llamacpp_build.tool_path("llama-server")


def llama_python_unavailable() -> str | None:
    import importlib.util

    from slimbench.engines import llamacpp_build

    why = llamacpp_build.python_unavailable()
    if why is None and importlib.util.find_spec("sse_starlette") is None:
        why = "llama-cpp-python's server needs its extras: pip install -r requirements-extras.txt"
    return why


def llama_flavour(wanted: str) -> str:
    """``native`` (llama.cpp's llama-server) or ``python`` (llama-cpp-python's server), or ValueError."""
    if wanted in ("auto", "native") and llama_server_path() is not None:
        return "native"
    if wanted == "native":
        from slimbench.engines import llamacpp_build

        raise ValueError(f"serving with llama-server: {llamacpp_build.tool_unavailable('llama-server')}")
    why = llama_python_unavailable()
    if why:
        raise ValueError(f"serving with llama.cpp: neither llama-server is built nor the Python server usable ({why})")
    return "python"


def vllm_python() -> str | None:
    """vLLM's interpreter: ``SLIMBENCH_VLLM_PYTHON`` (a GPU machine's own vLLM), else the environment
    SlimBench builds for vLLM's CPU wheel (slimbench.engines.vllm_env), if built."""
    from slimbench.engines import vllm_env

    exe = os.environ.get("SLIMBENCH_VLLM_PYTHON")
    if exe:
        return exe if Path(exe).exists() else None
    return str(vllm_env.python()) if vllm_env.unavailable() is None else None


def choose(lm: Any, cfg: Any) -> str:
    """The server for this cell, or ``ValueError`` saying why it cannot be served as asked."""
    engine = engine_of(lm)
    name = cfg.server if cfg.server != "auto" else {"vLLM": "vllm"}.get(engine, engine or "transformers")
    if name not in SERVERS:
        raise ValueError(f"the model runs in {engine}, which has no OpenAI-compatible server in SlimBench; "
                         f"servers: {', '.join(SERVERS)}")
    if name == "transformers":
        why = hosted.unavailable() or hosted.unsupported(lm)
        if why:
            raise ValueError(f"serving with transformers: {why}")
    elif name == "llama.cpp":
        if engine not in (None, "llama.cpp"):
            raise ValueError(f"the model runs in {engine}; llama.cpp serves GGUF files")
        llama_flavour(cfg.llama_server)
    elif name == "vllm":
        if vllm_python() is None:
            from slimbench.engines import vllm_env

            raise ValueError(f"serving with vLLM: {vllm_env.unavailable()} (or set SLIMBENCH_VLLM_PYTHON to a vLLM "
                             "environment's Python); docs/serving.md")
        if engine != "vLLM":
            raise ValueError("vLLM serves a saved model folder: add a vLLM engine step to the method chain")
    return name


def request_extras(name: str, lm: Any, flavour: str | None) -> dict[str, Any] | None:
    """Fields every request carries for this server (beyond what GuideLLM sends)."""
    if name == "llama.cpp" and flavour == "python":
        # llama-cpp-python ignores ``ignore_eos``: ban the end-of-text token instead, so every request
        # generates the length it asks for, as on the other servers
        eos = getattr(lm.tokenizer, "eos_token_id", None)
        return {"logit_bias": {str(eos): -100.0}} if eos is not None else None
    return None


def health_route(name: str, flavour: str | None) -> str:
    """The path GuideLLM checks before a run: llama-cpp-python's server has no ``/health``."""
    return "v1/models" if name == "llama.cpp" and flavour == "python" else "health"


def describe(name: str, flavour: str | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"transformers": "transformers", "llama.cpp": "llama_cpp_python", "vllm": "vllm"}[name]
    out: dict[str, Any] = {"flavour": flavour}
    try:
        out["version"] = version(dist)
    except PackageNotFoundError:
        out["version"] = None
    if name == "vllm" and not os.environ.get("SLIMBENCH_VLLM_PYTHON"):
        from slimbench.engines import vllm_env

        out["version"], out["environment"] = vllm_env.VLLM_VERSION, str(vllm_env.env_dir())
    if name == "llama.cpp":
        from slimbench.engines import llamacpp_build

        out["build"] = llamacpp_build.build_info()
    return out


def gguf_for(lm: Any, cfg: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    """The GGUF file llama.cpp serves, and what it is."""
    if engine_of(lm) == "llama.cpp":
        path = Path(lm.model.gguf)
        summary = (getattr(lm.model, "manifest", None) or {}).get("summary")
        return path, {"source": "the llama-cpp step's export", "file": path.name, "bytes": path.stat().st_size,
                      "summary": summary}
    from slimbench.engines.export import gguf_export

    path = work / "model.gguf"
    manifest = gguf_export.export(lm, path, weights=cfg.gguf_weights)
    return path, {"source": "exported for this cell", "file_type": manifest["file_type"],
                  "bytes": path.stat().st_size, "summary": manifest["summary"]}


def _llama_cpp(lm: Any, cfg: Any, work: Path, port: int, threads: int, flavour: str) -> ServerProcess:
    from slimbench.engines import llamacpp_build

    gguf, what = gguf_for(lm, cfg, work)
    per_seq = cfg.max_prompt_tokens + cfg.max_output_tokens + 16
    env = {**_child_env(threads), **llamacpp_build.lib_env()}
    if flavour == "native":
        slots = cfg.slots
        cmd = [str(llama_server_path()), "--model", str(gguf), "--alias", "slimbench", "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(threads), "--threads-batch", str(threads),
               "--ctx-size", str(per_seq * slots), "--parallel", str(slots), "--no-webui",
               # no prompt cache across requests (the serving protocol's load points repeat prompts)
               "--no-cache-prompt", "--cache-ram", "0"]
        ready = "/health"
    else:
        slots = 1
        cmd = [llamacpp_python(), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "slimbench",
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--n_ctx", str(per_seq), "--logits_all", "False",
               "--interrupt_requests", "False", "--cache", "False"]
        ready = "/v1/models"
    server = ServerProcess(f"llama.cpp ({flavour})", cmd, port, work / "server.log", env=env, ready_path=ready,
                           cpus=cfg.server_cpus)
    server.settings = {"flavour": flavour, "gguf": what, "threads": threads, "slots": slots, "ctx_per_slot": per_seq,
                       "prompt_cache": False}
    return server


def llamacpp_python() -> str:
    from slimbench.engines import llamacpp

    return llamacpp.python_executable()


def build(name: str, lm: Any, cfg: Any, ctx: Any, work: Path) -> Any:
    """The server object (not started): ``start``, ``stop``, ``alive``, ``url``, ``cpu_seconds``, ..."""
    port = free_loopback_port()
    threads = cfg.server_threads or getattr(lm.model, "threads", None) or ctx.hardware.threads or 1
    if name == "transformers":
        return hosted.HostedTransformersServer(lm, port, continuous_batching=cfg.continuous_batching,
                                               kv_tokens=cfg.kv_tokens, max_batch_tokens=cfg.max_batch_tokens,
                                               cpus=cfg.server_cpus)
    if name == "llama.cpp":
        return _llama_cpp(lm, cfg, work, port, int(threads), llama_flavour(cfg.llama_server))
    return _vllm(lm, cfg, work, port, int(threads))


def _vllm(lm: Any, cfg: Any, work: Path, port: int, threads: int) -> ServerProcess:
    from slimbench.engines.vllm import bind_cpus

    model_dir = lm.model.folder  # the vLLM step's export (compressed-tensors, tokenizer included)
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "slimbench", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", lm.model.compute_dtype, "--max-num-seqs", str(lm.model.max_num_seqs),
           "--max-model-len", str(cfg.max_prompt_tokens + cfg.max_output_tokens + 16),
           "--no-enable-prefix-caching"]  # the serving protocol's load points repeat prompts
    env = _child_env(threads)
    env.pop("PYTHONPATH", None)  # vLLM's environment must not see SlimBench's packages
    cpus = ",".join(str(c) for c in cfg.server_cpus) if cfg.server_cpus else bind_cpus(threads)
    env.update(VLLM_CPU_OMP_THREADS_BIND=cpus, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    if not os.environ.get("SLIMBENCH_VLLM_PYTHON"):
        cmd.append("--enforce-eager")  # the CPU build: no torch.compile of the model at start-up
    server = ServerProcess("vLLM", cmd, port, work / "server.log", env=env, ready_path="/health",
                           cpus=cfg.server_cpus)
    server.settings = {"model_dir": str(model_dir), "prefix_caching": False}
    return server


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env
