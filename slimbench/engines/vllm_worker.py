"""The vLLM side of the vLLM engine: runs in vLLM's own environment (engine_process), no SlimBench torch.

vLLM pins its own torch and transformers, so this module is started with the interpreter of
the environment SlimBench builds for it (slimbench.engines.vllm_env) and imports nothing of
SlimBench but ``engine_process`` (standard library only). The engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the owner), so one ``step()`` is one scheduler step
of vLLM's own loop: a decode step produces one token per running sequence.

vLLM hands out log-probabilities, not logits: the per-token NLL of a prompt comes from
``prompt_logprobs`` (the log-probability vLLM computed for each prompt token given the ones
before it, from the raw logits), and a prefill's next-token distribution from ``logprobs`` (the
engine's ``max_logprobs`` most likely tokens).

Requests (``handle``):
- ``token_nll``: ``rows`` (token id lists) -> per-row lists of the NLL of tokens 1..T-1.
- ``prefill``: ``rows`` -> per row ``(token ids, log-probabilities)`` of the top next tokens.
- ``start``: ``rows``, ``n``: queue greedy generations of ``n`` tokens (EOS ignored) and run
  steps until every row has its first token; returns those tokens. ``step``: one scheduler step
  until every row has one more token; returns them. Together: what the efficiency task times.
- ``generate``: ``rows``, ``n``: the same loop inside the engine with a ``perf_counter_ns``
  stamp per step (engine-bench).
- ``memory``: peak/current RSS of this process.
"""

from __future__ import annotations

import os
import time
from typing import Any

from slimbench.engines.engine_process import peak_rss_bytes


class VllmState:
    def __init__(self, payload: dict[str, Any]):
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.vllm, self.torch, self.SamplingParams, self.TokensPrompt = vllm, torch, SamplingParams, TokensPrompt
        t0 = time.perf_counter()
        self.llm = LLM(
            model=payload["path"], dtype=payload["dtype"], enforce_eager=True, seed=0,
            max_model_len=payload["max_model_len"], max_num_seqs=payload["max_num_seqs"],
            max_logprobs=payload["max_logprobs"], skip_tokenizer_init=True, enable_prefix_caching=False,
        )
        self.load_seconds = time.perf_counter() - t0
        self.weight_bytes = self._weight_bytes()
        self.engine = self.llm.llm_engine
        self.top_k = payload["max_logprobs"]
        self.active: list[str] = []
        self.counts: dict[str, int] = {}
        self.serial = 0

    def _weight_bytes(self) -> int | None:
        """Bytes of the parameters and buffers vLLM's model holds (its own layout, after loading)."""
        def count(model) -> int:
            tensors = [*model.parameters(), *model.buffers()]
            return sum(t.numel() * t.element_size() for t in tensors)

        try:
            return int(self.llm.apply_model(count)[0])
        except Exception:  # an engine build without apply_model: said as unknown
            return None

    def info(self) -> dict[str, Any]:
        torch = self.torch
        return {
            "pid": os.getpid(),
            "vllm": self.vllm.__version__,
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "load_seconds": self.load_seconds,
            "weight_bytes": self.weight_bytes,
            **peak_rss_bytes(),
        }

    def _params(self, **kw):
        return self.SamplingParams(temperature=0.0, detokenize=False, **kw)

    def _run(self, rows: list[list[int]], params) -> list[Any]:
        prompts = [self.TokensPrompt(prompt_token_ids=list(r)) for r in rows]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def token_nll(self, rows: list[list[int]]) -> list[list[float]]:
        outs = self._run(rows, self._params(max_tokens=1, prompt_logprobs=0))
        nll = []
        for row, out in zip(rows, outs, strict=True):
            lp = out.prompt_logprobs  # position 0 has none (no context)
            nll.append([-lp[i][row[i]].logprob for i in range(1, len(row))])
        return nll

    def prefill(self, rows: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        outs = self._run(rows, self._params(max_tokens=1, logprobs=self.top_k))
        top = []
        for out in outs:
            step = out.outputs[0].logprobs[0]
            top.append(([int(k) for k in step], [float(v.logprob) for v in step.values()]))
        return top

    # -- step-level decoding ---------------------------------------------------------------------
    def _drain(self) -> None:
        if self.active:
            self.engine.abort_request(self.active)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        self.active, self.counts = [], {}

    def _start(self, rows: list[list[int]], n: int) -> list[int]:
        self._drain()
        params = self._params(max_tokens=n, ignore_eos=True)
        for row in rows:
            self.serial += 1
            rid = f"r{self.serial}"
            self.engine.add_request(rid, self.TokensPrompt(prompt_token_ids=list(row)), params)
            self.active.append(rid)
            self.counts[rid] = 0
        return self._advance()

    def _advance(self) -> list[int]:
        """Step until every active row has produced one more token; return those tokens."""
        want = {rid: self.counts[rid] + 1 for rid in self.active}
        latest: dict[str, int] = {}
        while any(self.counts[r] < want[r] for r in self.active):
            if not self.engine.has_unfinished_requests():
                raise RuntimeError("vLLM finished the requests before the asked number of tokens")
            for out in self.engine.step():
                rid = out.request_id if out.request_id in self.counts else out.request_id.rpartition("-")[0]
                if rid in self.counts:
                    ids = out.outputs[0].token_ids
                    self.counts[rid] = len(ids)
                    latest[rid] = int(ids[min(want[rid], len(ids)) - 1])
        return [latest[r] for r in self.active]

    def _generate(self, rows: list[list[int]], n: int) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        tokens = [self._start(rows, n)]
        stamps = [time.perf_counter_ns()]
        for _ in range(n - 1):
            tokens.append(self._advance())
            stamps.append(time.perf_counter_ns())
        self._drain()
        return {"start_ns": t0, "stamps_ns": stamps, "tokens": tokens}

    def handle(self, req: dict[str, Any]) -> Any:
        op = req["op"]
        if op == "token_nll":
            return self.token_nll(req["rows"])
        if op == "prefill":
            return self.prefill(req["rows"])
        if op == "start":
            return self._start(req["rows"], req["n"])
        if op == "step":
            return self._advance()
        if op == "generate":
            return self._generate(req["rows"], req["n"])
        if op == "memory":
            return peak_rss_bytes()
        raise ValueError(f"unknown request {op!r}")

    def close(self) -> None:
        self._drain()


def open_engine(payload: dict[str, Any]) -> VllmState:
    return VllmState(payload)
