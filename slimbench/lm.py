"""The narrow interface through which tasks talk to a model.

Tasks never reach into a model's modules; they call these few methods, whose semantics
are fixed here so every task computes the same quantity the same way:

- ``encode(text)`` -> token ids, no special tokens added.
- ``token_nll(ids)`` -> for a batch ``ids`` of shape ``[B, T]``, the negative log-likelihood
  (natural log, float32) of each token ``ids[:, t]`` given ``ids[:, :t]``, for ``t = 1..T-1``:
  shape ``[B, T-1]``. Example: for ids ``[[a, b, c]]`` the result is
  ``[[-log p(b|a), -log p(c|a,b)]]``.
- ``prefill(ids, capacity=None)`` / ``decode(token, cache)`` -> next-token logits ``[B, V]`` and the
  KV cache, the two phases of autoregressive inference (used for latency). ``capacity`` is the
  longest sequence the cache must hold (prompt + new tokens), for pre-allocated caches.
- ``generate(ids, n, on_tokens=None)`` -> ``[B, n]`` greedily generated tokens; ``on_tokens(k)`` is
  called each time ``k`` more tokens of every row exist (one at a time for plain decoding, a
  burst for speculative decoding), so a caller can timestamp them. ``greedy(ids, n)`` is the
  same without the callback.

The evaluation calls, with the semantics of EleutherAI's lm-evaluation-harness (``HFLM``):

- ``loglikelihood([(context, continuation), ...])`` -> ``[(logprob, is_greedy), ...]``: the summed
  log-probability (natural log) of the continuation's tokens given the context, and whether every
  one of them is the argmax. Tokenization is the harness' "encode whole, then split": trailing
  whitespace of the context moves to the continuation, ``whole = encode(context + continuation)``,
  ``ctx = encode(context)``, ``cont = whole[len(ctx):]``, and the model reads ``ctx + cont``. So a
  merge across the boundary (BPE joins ``" a"`` into one token) is scored as the model would see
  the full text. An empty context is replaced by one prefix token (BOS, else EOS). Example with
  GPT-2's BPE: ``("The cat sat on the ", "mat")`` -> context ``"The cat sat on the"`` (5 tokens),
  continuation ``" mat"`` (1 token); the result is ``log p(" mat" | "The cat sat on the")``
  and ``True`` if ``" mat"`` is the model's top-1 next token. ``encode_pair(..., mode="separate")``
  encodes the two strings independently instead (no boundary merges); both are tested.
  Inputs longer than ``max_length + 1`` tokens are cut from the left, as in the harness.
  Requests are batched longest first with right padding (a causal model never attends to the
  padding after a token, so it changes nothing), and requests sharing a context run that context
  once and reuse its KV cache for every continuation (``share_context=True``).
- ``loglikelihood_rolling([text, ...])`` -> summed log-probability of every token of each text,
  scored in disjoint windows of ``max_length`` tokens (the harness' rolling windows with
  context length 1); the first token is predicted from the prefix token.
- ``generate_until(context, until, max_new_tokens)`` -> greedy continuation text, cut at the
  first stop string (or EOS).
- ``next_token_logits(ids)`` -> ``[B, V]`` float32 logits of the token after each row of ``ids``.
- ``embed(texts)`` -> ``[N, H]`` mean-pooled, L2-normalised last hidden states (sentence
  embeddings, as sentence-transformers' all-MiniLM does); works for encoders and decoders.

Methods, by contrast, may change ``model`` (the ``torch.nn.Module``) in place or replace it.
Acceleration methods change how the model *executes*, through three hooks of this class:

- replace ``model`` by a module with the same call contract (``forward(input_ids=..., cache=...,
  use_cache=..., **kw)`` returning an object with ``.logits`` and ``.cache``, and a ``config``):
  a compiled model, an ONNX Runtime session, a model split over processes. Every task then runs
  through it unchanged.
- ``cache_factory(lm, batch_size, capacity) -> cache``: the KV cache object ``prefill`` starts
  from (static, offloaded, quantized, sliding-window ...); None: the model's default dynamic one.
- ``generator``: an object with ``generate(lm, ids, n, on_tokens) -> [B, n]`` that replaces the
  token-by-token greedy loop (speculative decoding). Its output must equal plain greedy decoding.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F


@dataclass
class LanguageModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Facts about where the weights came from, copied into every record of this model.
    provenance: dict[str, Any] = field(default_factory=dict)
    # The ModelSpec this model was loaded from (set by the runner); tasks that need the
    # uncompressed model again (fidelity) reload it from this. None: unknown.
    spec: Any = None
    # Execution hooks set by acceleration methods (see the module docstring). None: eager
    # transformers with its default dynamic KV cache and the plain greedy loop.
    cache_factory: Callable[[LanguageModel, int, int], Any] | None = None
    generator: Any = None

    # -- text ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- scoring -------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    @torch.inference_mode()
    def token_nll(self, ids: torch.Tensor) -> torch.Tensor:
        engine_nll = getattr(self.model, "token_nll", None)
        if engine_nll is not None:  # an engine that hands out log-probabilities, not logits (vLLM)
            return engine_nll(ids).float().to(self.device)
        ids = ids.to(self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
        # float32 log-softmax whatever the model dtype: a bf16 softmax over 50k words
        # would add error the method did not cause.
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        return nll.view(ids.shape[0], -1)

    # -- generation ----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, Any]:
        kw = {}
        if self.cache_factory is not None:
            kw["cache"] = self.cache_factory(self, ids.shape[0], capacity or ids.shape[1])
        out = self.model(input_ids=ids.to(self.device), use_cache=True, **kw)
        return out.logits[:, -1], out.cache

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=token.to(self.device), cache=cache, use_cache=True)
        return out.logits[:, -1], out.cache

    @torch.inference_mode()
    def generate(
        self, ids: torch.Tensor, n: int, on_tokens: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """``n`` greedy tokens after each row of ``ids``; see the module docstring."""
        if self.generator is not None:
            return self.generator.generate(self, ids, n, on_tokens)
        logits, cache = self.prefill(ids, capacity=ids.shape[1] + n)
        tokens = []
        for i in range(n):
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            if on_tokens is not None:
                on_tokens(1)
            if i < n - 1:  # the last token needs no forward pass of its own
                logits, cache = self.decode(nxt, cache)
        return torch.cat(tokens, dim=1)

    def greedy(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return self.generate(ids, n)

    def synchronize(self) -> None:
        """Wait for queued device work, so a clock read after it measures the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- evaluation interface (lm-evaluation-harness semantics; see the module docstring) --------
    @property
    def max_length(self) -> int:
        """Longest input the model takes (its position limit; 2048 if the config does not say)."""
        cfg = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def prefix_token_id(self) -> int:
        """The token that stands for an empty context: BOS if the tokenizer has one, else EOS."""
        tok = self.tokenizer
        for tid in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)):
            if tid is not None:
                return int(tid)
        raise ValueError(f"{self.name}: the tokenizer has neither a BOS nor an EOS token to stand for an empty context")

    def encode_pair(
        self, context: str, continuation: str, mode: Literal["whole", "separate"] = "whole"
    ) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, tokenized as the harness does (see module docstring)."""
        if not continuation:
            raise ValueError("a log-likelihood request needs a non-empty continuation")
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # "... the " + "mat" is scored as "... the" + " mat", as BPE sees it
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        ctx = self.encode(context)
        if mode == "separate":
            return ctx, self.encode(continuation)
        whole = self.encode(context + continuation)
        cont = whole[len(ctx):]
        if not cont:  # the context's last token absorbed the whole continuation
            return ctx, self.encode(continuation)
        return ctx, cont

    def loglikelihood(
        self,
        requests: Sequence[tuple[str, str]],
        *,
        batch_size: int = 16,
        share_context: bool = True,
        mode: Literal["whole", "separate"] = "whole",
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request, in request order.

        >>> lm.loglikelihood([("The capital of France is", " Paris")])  # doctest: +SKIP
        [(-1.23, True)]
        """
        pairs = [self.encode_pair(c, x, mode) for c, x in requests]
        return self.loglikelihood_tokens(pairs, batch_size=batch_size, share_context=share_context)

    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16, share_context: bool = True
    ) -> list[tuple[float, bool]]:
        """``loglikelihood`` on already tokenized (context ids, continuation ids) pairs."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        pending = list(range(len(pairs)))
        if share_context:
            pending = self._score_shared_groups(pairs, results, batch_size)
        # Longest first: a too-large batch fails at once, and similar lengths pad little.
        pending.sort(key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), i))
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            for i, res in zip(chunk, self._score_padded([pairs[i] for i in chunk]), strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def _score_shared_groups(self, pairs, results, batch_size: int) -> list[int]:
        """Score groups of >= 2 requests with the same context through one context pass; return the rest."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        rest: list[int] = []
        for ctx, idx in sorted(groups.items(), key=lambda kv: -len(kv[0])):
            longest = max(len(pairs[i][1]) for i in idx)
            if len(idx) < 2 or len(ctx) + longest - 1 > self.max_length:
                rest += idx  # nothing to share, or left truncation would differ per request
                continue
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                for i, res in zip(chunk, self._score_shared(list(ctx), [pairs[i][1] for i in chunk]), strict=True):
                    results[i] = res
        return rest

    def _accepts(self, kwarg: str) -> bool:
        try:
            return kwarg in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False

    @staticmethod
    def _sum_and_greedy(logits: torch.Tensor, target: list[int]) -> tuple[float, bool]:
        """Sum of log-softmax at the target tokens (float32) and whether each is the argmax."""
        logp = F.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(target, device=logp.device)
        total = logp.gather(1, tgt[:, None]).sum().item()
        return float(total), bool((logp.argmax(-1) == tgt).all().item())

    @torch.inference_mode()
    def _score_padded(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One right-padded forward over the requests (no sharing)."""
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in pairs]
        width = max(len(x) for x in inputs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
        batch = torch.full((len(inputs), width), pad, dtype=torch.long)
        for row, x in enumerate(inputs):
            batch[row, : len(x)] = torch.tensor(x)
        logits = self.model(input_ids=batch.to(self.device), use_cache=False).logits
        out = []
        for row, ((_, cont), x) in enumerate(zip(pairs, inputs, strict=True)):
            n = len(cont)
            out.append(self._sum_and_greedy(logits[row, len(x) - n : len(x)], cont))
        return out

    @torch.inference_mode()
    def _score_shared(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Run ``ctx`` once, then every continuation on a copy of its KV cache (one padded batch)."""
        # Only the last position's logits are needed: skip the output layer elsewhere where the
        # model supports it (a 49k-word head is a fifth of SmolLM2's compute per token).
        keep = {"logits_to_keep": 1} if self._accepts("logits_to_keep") else {}
        out = self.model(input_ids=torch.tensor([ctx], device=self.device), use_cache=True, **keep)
        first = out.logits[0, -1:]  # predicts each continuation's first token
        tails = [c[:-1] for c in conts]
        width = max(len(t) for t in tails)
        if width == 0:
            return [self._sum_and_greedy(first, c) for c in conts]
        if not hasattr(out.cache, "batch_repeat_interleave"):  # a cache type we cannot fan out: no sharing
            return self._score_padded([(ctx, c) for c in conts])
        cache = copy.deepcopy(out.cache)
        cache.batch_repeat_interleave(len(conts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
        batch = torch.full((len(conts), width), pad, dtype=torch.long)
        for row, t in enumerate(tails):
            batch[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        logits = self.model(input_ids=batch.to(self.device), cache=cache, use_cache=True).logits
        return [
            self._sum_and_greedy(torch.cat([first, logits[row, : len(t)]]), c)
            for row, (t, c) in enumerate(zip(tails, conts, strict=True))
        ]

    def rolling_windows(self, ids: list[int], max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
        """Disjoint (context, continuation) windows covering every token of ``ids`` exactly once.

        The harness' ``get_rolling_token_windows`` with context length 1 then
        ``make_disjoint_window``: the first window predicts ``ids[:L]`` from the prefix token,
        each later one the next ``L`` tokens from the ``L`` tokens before them (one pass each).
        """
        length = max_length or self.max_length
        windows: list[tuple[list[int], list[int]]] = []
        if not ids:
            return windows
        first = min(length, len(ids))
        windows.append(([self.prefix_token_id], ids[:first]))
        done = first
        while done < len(ids):
            end = min(done + length, len(ids))
            pred = ids[done:end]
            ctx = ids[end - length - 1 : end - 1] if end - length - 1 >= 0 else ids[: end - 1]
            windows.append((ctx[: len(ctx) - (len(pred) - 1)], pred))
            done = end
        return windows

    def loglikelihood_rolling(
        self, texts: Sequence[str], *, batch_size: int = 4, max_length: int | None = None
    ) -> list[float]:
        """Summed log-probability of each whole text (all its tokens), in rolling windows."""
        out = []
        for text in texts:
            windows = self.rolling_windows(self.encode(text), max_length)
            scores = self.loglikelihood_tokens(windows, batch_size=batch_size, share_context=False)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.inference_mode()
    def next_token_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, V]`` of the token following each row of ``ids`` (no padding)."""
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits[:, -1].float()

    @torch.inference_mode()
    def generate_until(self, context: str, until: Sequence[str] = (), max_new_tokens: int = 64) -> str:
        """Greedy continuation of ``context``, cut before the first stop string; stops at EOS."""
        ids = self.encode(context) or [self.prefix_token_id]
        ids = ids[-max(1, self.max_length - max_new_tokens) :]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        logits, cache = self.prefill(torch.tensor([ids]), capacity=len(ids) + max_new_tokens)
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0].argmax())
            if nxt == eos:
                break
            new.append(nxt)
            text = self.decode_ids(new)
            if any(s and s in text for s in until):
                break
            logits, cache = self.decode(torch.tensor([[nxt]]), cache)
        text = self.decode_ids(new)
        cut = min((text.index(s) for s in until if s and s in text), default=len(text))
        return text[:cut]

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, batch_size: int = 32, max_tokens: int = 256) -> torch.Tensor:
        """Mean-pooled (over real tokens), L2-normalised last hidden states: ``[N, H]`` float32."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True,
                max_length=max_tokens, return_tensors="pt",
            ).to(self.device)
            out = self.model(**batch, output_hidden_states=True)
            hidden = getattr(out, "last_hidden_state", None)
            hidden = hidden if hidden is not None else out.hidden_states[-1]  # decoders: no last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(F.normalize(pooled.float(), dim=-1))
        return torch.cat(chunks)
