"""`transformers serve` hosting the cell's compressed model, in the cell's own process.

`transformers serve` loads models by name; a compressed model (packed codes, factorized layers,
pruned weights) exists only in the cell's memory. So SlimBench builds the same server
(``transformers.cli.serve.Serve``: its FastAPI app, its OpenAI ``/v1/completions`` and
``/v1/chat/completions`` handlers, its generation managers, optionally continuous batching
with a paged KV cache) and puts the in-memory model into its model manager under the name
``slimbench`` before the server answers. Everything after that is transformers' own code.

Two adjustments, both stated in the record:

- ``ignore_eos``: load generators ask for exactly ``max_tokens`` tokens with ``ignore_eos``
  (vLLM's parameter); transformers' handler refuses unknown fields. A small ASGI shim turns it
  into the request's ``generation_config`` with ``min_new_tokens = max_new_tokens`` and greedy
  decoding, so every model generates the lengths asked for.
- continuous batching on CPU would size its KV cache at 90% of the machine's free RAM; the
  cache is sized from ``kv_tokens`` instead.

The server's CPU time is the process' own CPU time (the load generator is a child process and
is counted apart). Errors it answers are kept (method, path, status, body) as its log.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import psutil

from slimbench.engines.serving.process import ServerError, http_json, set_affinity

MODEL_NAME = "slimbench"


def unavailable() -> str | None:
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return "transformers is too old for `transformers serve`"
    if not is_serve_available():
        return "the PyTorch server needs `transformers serve`'s extras: pip install fastapi uvicorn openai"
    return None


def unsupported(lm: Any) -> str | None:
    """Why transformers' server cannot serve this model as SlimBench runs it (None: it can)."""
    from transformers import PreTrainedModel

    if not isinstance(lm.model, PreTrainedModel):
        return (f"the model is a {type(lm.model).__name__} (an engine's model), not a transformers model: "
                "serve it with its engine's server")
    if lm.generator is not None:
        return "a generator (speculative decoding) drives this model; transformers' server would bypass it"
    if lm.cache_factory is not None:
        return "a custom KV cache runs this model; transformers' server would use its own cache instead"
    return None


class _Log(logging.Handler):
    """The server's last log records, in memory (its failures go into the failed record)."""

    def __init__(self, lines: int = 200) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.append(f"{record.name} {record.levelname}: {record.getMessage()}")
            if record.exc_info and record.exc_info[1] is not None:  # what was raised, not the whole stack
                exc = record.exc_info[1]
                self.lines.append(f"  {type(exc).__name__}: {exc}")


def _ignore_eos_shim(app: Any, model: Any, log: _Log) -> Any:
    """ASGI wrapper: ``ignore_eos`` -> a generation_config with exactly ``max_tokens`` new tokens; log errors."""

    def rewrite(body: dict[str, Any]) -> dict[str, Any]:
        ignore = body.pop("ignore_eos", None)
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if ignore and limit and "generation_config" not in body:
            cfg = model.generation_config.to_dict()
            cfg.update(max_new_tokens=int(limit), min_new_tokens=int(limit), do_sample=False)
            body["generation_config"] = json.dumps(cfg)
        return body

    async def shim(scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await app(scope, receive, send)
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        raw = b"".join(chunks)
        with contextlib.suppress(ValueError, AttributeError):
            raw = json.dumps(rewrite(json.loads(raw))).encode()
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        status = {"code": 200}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and status["code"] >= 400:
                log.lines.append(f"POST {scope.get('path')} -> {status['code']}: "
                                 f"{message.get('body', b'')[:300].decode(errors='replace')}")
            await send(message)

        return await app(scope, replay, watch)

    return shim


class HostedTransformersServer:
    """`transformers serve` in this process, serving ``lm`` as ``slimbench``; the ServerProcess calls."""

    kind = "in-process"
    name = "transformers"

    def __init__(self, lm: Any, port: int, *, continuous_batching: bool, kv_tokens: int, max_batch_tokens: int,
                 cpus: Sequence[int] = ()) -> None:
        self.lm, self.port, self.cpus = lm, port, tuple(cpus)
        self.continuous_batching = continuous_batching
        self.kv_tokens, self.max_batch_tokens = kv_tokens, max_batch_tokens
        self.model_name = MODEL_NAME
        self.serve: Any = None
        self.log = _Log()
        self._loggers: list[tuple[logging.Logger, int]] = []
        self._affinity_before: list[int] | None = None
        self._access: tuple | None = None
        self.settings: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    LOGGERS = ("transformers", "uvicorn.error", "uvicorn")

    def _capture_logs(self, levels: dict[str, int]) -> None:
        """Keep the server's log records; ``levels``: each logger's level before the server changed it."""
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._loggers.append((logger, levels[name]))
            logger.addHandler(self.log)

    def _cb_config(self) -> dict[str, Any]:
        page = 256
        return {"cb_num_blocks": max(1, math.ceil(self.kv_tokens / page)), "cb_max_batch_tokens": self.max_batch_tokens}

    def start(self, timeout_s: float) -> None:
        from transformers.cli.serve import Serve
        from transformers.cli.serving.model_manager import TimedModel

        class Hosted(Serve):
            def start_server(self) -> None:  # started below, once the model is in place
                pass

        if self.cpus:
            self._affinity_before = sorted(os.sched_getaffinity(0))
            set_affinity([os.getpid()], self.cpus)
        levels = {name: logging.getLogger(name).level for name in self.LOGGERS}  # Serve sets them
        access_level = logging.getLogger("uvicorn.access").level  # uvicorn's config sets it too
        cb = self._cb_config() if self.continuous_batching else {}
        self.settings = {"continuous_batching": self.continuous_batching, **cb}
        self.serve = Hosted(host="127.0.0.1", port=self.port, non_blocking=True, log_level="error",
                            continuous_batching=self.continuous_batching, device=str(self.lm.device), **cb)
        cb_config = self.serve._generation_state._cb_config
        if cb_config is not None:
            # no prefix (block) sharing across requests: each load point repeats the workload's
            # first prompts, which a shared block would serve without their prefill
            cb_config.allow_block_sharing = False
            self.settings["prefix_sharing"] = False
        self._capture_logs(levels)  # after uvicorn configured its loggers (that resets their handlers)
        manager = self.serve._model_manager
        key = manager.process_model_name(MODEL_NAME)
        manager.loaded_models[key] = TimedModel(self.lm.model, timeout_seconds=-1, processor=self.lm.tokenizer)
        config = self.serve.server.config
        config.app.add_exception_handler(Exception, self._on_exception)  # before the 500 is sent
        config.app = _ignore_eos_shim(config.app, self.lm.model, self.log)
        access = logging.getLogger("uvicorn.access")  # one line per request would cost the server's CPU
        self._access = (access, list(access.handlers), access.propagate, access.disabled, access_level)
        access.handlers, access.propagate, access.disabled = [], False, True
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        Serve.start_server(self.serve)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError, ValueError):
                if http_json(self.url + "/health", timeout=2.0)[0] == 200:
                    return
            if not self.alive():
                raise self.error("transformers' server thread ended before it was ready")
            if time.monotonic() > deadline:
                raise self.error(f"transformers' server was not ready after {timeout_s:.0f} s")
            time.sleep(0.1)

    async def _on_exception(self, request: Any, exc: Exception) -> Any:
        from starlette.responses import PlainTextResponse

        self.log.lines.append(f"{request.method} {request.url.path} raised {type(exc).__name__}: {exc}")
        return PlainTextResponse(f"Internal Server Error: {type(exc).__name__}: {exc}", status_code=500)

    def alive(self) -> bool:
        thread = getattr(self.serve, "_thread", None)
        return thread is not None and thread.is_alive()

    def pids(self) -> list[int]:
        return [os.getpid()]

    def cpu_seconds(self) -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.log.lines)[-lines:])

    def error(self, message: str) -> ServerError:
        return ServerError(f"{message}; its last log lines:\n{self.log_tail()}")

    def stop(self, grace_s: float = 5.0) -> None:
        serve, self.serve = self.serve, None
        if serve is not None:
            with contextlib.suppress(Exception):
                serve.kill_server()
            thread = getattr(serve, "_thread", None)
            if thread is not None:
                thread.join(timeout=grace_s)
                if thread.is_alive():
                    self.log.lines.append("the server thread did not stop in time")
            with contextlib.suppress(Exception):
                serve._model_manager.loaded_models.clear()  # drop its reference to the model
        for logger, level in self._loggers:
            logger.removeHandler(self.log)
            logger.setLevel(level)
        self._loggers = []
        if self._access is not None:
            access, handlers, propagate, disabled, level = self._access
            access.handlers, access.propagate, access.disabled = handlers, propagate, disabled
            access.setLevel(level)
            self._access = None
        if self._affinity_before is not None:
            set_affinity([os.getpid()], self._affinity_before)
            self._affinity_before = None
