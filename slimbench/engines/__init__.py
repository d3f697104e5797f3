"""Execution engines beyond one eager PyTorch process.

Everything here plugs into the hooks of ``slimbench.lm.LanguageModel`` (its module docstring):
an engine replaces ``lm.model`` by a module with the same call contract, or sets
``lm.generator``. Every task then runs through it unchanged.

- ``speculative``: a ``generator`` for assisted greedy decoding (model, compressed-copy and
  prompt-lookup drafts).
- ``workers``: N worker processes driven over pipes, with crash/timeout detection and shutdown;
  ``pipeline`` and ``tensor_parallel`` run a model split across them (``parallel`` method).
- ``backend``: the execution-backend interface (``onnxruntime`` implements it; vLLM or
  TensorRT-LLM would implement the same three calls).
"""
