"""The execution-backend interface: how an inference engine other than eager PyTorch plugs in.

A backend turns a loaded ``LanguageModel`` into an *engine model*, which replaces ``lm.model``;
every task then runs through it unchanged (``slimbench.lm``'s hooks). Three calls:

- ``unavailable() -> str | None``: why the backend cannot run on this machine (package not
  installed, no GPU), or None. Checked before any cell starts work.
- ``unsupported(lm) -> str | None``: why it cannot run this model (architecture, dtype, a
  preceding step it cannot follow), or None. Called from the method's ``check()``.
- ``build(lm, options) -> EngineModel``: export / compile / load the model into the engine.

An ``EngineModel`` is an ``nn.Module`` with the call contract of ``slimbench.lm``:
``forward(input_ids=[B, T], cache=None | EngineCache, use_cache=bool)`` returns an object with
``.logits`` (``[B, T, V]`` torch tensor on ``lm.device``) and ``.cache``; a ``config`` (the HF
config: ``max_position_embeddings``, ``model_type``); ``slimbench_size() -> dict`` (parameters,
memory_bytes, stored_bytes, stored_format, effective_bits: what the engine really holds and
stores, which the harness reports instead of walking torch modules); optionally
``slimbench_files() -> [Path]``, the files ``stored_bytes`` counts (the method contract checks
their size); ``close()``.

An ``EngineCache`` is whatever the engine keeps between calls, behind ``get_seq_length()`` and
``crop(-n)`` (drop the last n tokens: speculative decoding needs it; transformers' convention).

ONNX Runtime (``slimbench.engines.onnxruntime``) implements it with an exported graph whose KV
cache is a list of arrays fed back each step. vLLM or TensorRT-LLM would fit the same way:
``build`` starts the engine from the model's folder (after the preceding steps, a folder the
harness saves), the ``EngineCache`` is a handle to a sequence id in the engine's own paged KV
cache (``crop`` frees its last blocks), ``forward`` submits the new tokens of that sequence and
asks for the logits (both expose them), and ``slimbench_size`` reads the engine's weight memory.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class EngineCache(Protocol):
    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def crop(self, tokens: int) -> None: ...


@runtime_checkable
class EngineModel(Protocol):
    config: Any

    def __call__(self, input_ids: torch.Tensor, cache: EngineCache | None = None, use_cache: bool = False) -> Any: ...

    def slimbench_size(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class ExecutionBackend(Protocol):
    name: str

    def unavailable(self) -> str | None: ...

    def unsupported(self, lm) -> str | None: ...

    def build(self, lm, options: Any) -> EngineModel: ...
