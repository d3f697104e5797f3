"""Speculative (assisted) greedy decoding: a cheap draft proposes, the target verifies in one pass.

Each step the draft proposes up to ``k`` tokens after the sequence so far; the target runs the
last accepted token plus the ``k`` proposals in one forward pass on its KV cache, which gives
its own greedy choice after every prefix. The longest prefix of proposals that equals those
choices is accepted, and the target's choice after it (a correction, or a bonus token when
every proposal was accepted) is appended: each step yields between 1 and ``k + 1`` tokens, and
every one of them is the target's own argmax after the tokens before it, so the output is
token-for-token the target's greedy decoding (Leviathan et al. 2023; HF's assisted generation).
The target's cache is then cropped back to the accepted tokens.

Drafters (``propose(seqs, k) -> [B, <=k]`` and ``accepted(n_kept)``):

- ``ModelDrafter``: another causal LM sharing the target's vocabulary (a registered model, or a
  compressed copy of the target), decoding greedily with its own KV cache.
- ``PromptLookupDrafter``: no second model; proposes the tokens that followed the most recent
  earlier occurrence of the sequence's last n-gram (Saxena 2023, "prompt lookup decoding").

Batches run in lockstep: every row advances by the smallest accepted count of the batch (each
row's tokens are still its target-greedy tokens), so a batch needs rows of equal length (no
padding), which is what the efficiency task feeds.

The target must expose the call contract of ``slimbench.lm`` and a cache with ``crop(-n)`` and
``get_seq_length()`` (transformers' DynamicCache has them; so do the engines' own caches here).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class SpeculativeMismatch(RuntimeError):
    """Speculative output differs from the target's own greedy decoding."""


@dataclass
class SpecStats:
    """Counters over every generate() call since the last reset."""

    calls: int = 0
    steps: int = 0  # target verification passes (after the prefill)
    drafted: int = 0  # proposals verified, per row, summed over steps
    accepted: int = 0  # proposals accepted (lockstep: the batch's minimum), summed over steps
    generated: int = 0  # tokens per row produced, summed over calls
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0  # target passes: the prefill and every verification
    accepted_per_step: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        busy = self.draft_seconds + self.verify_seconds
        hist: dict[int, int] = {}
        for a in self.accepted_per_step:
            hist[a] = hist.get(a, 0) + 1
        return {
            "calls": self.calls,
            "steps": self.steps,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "generated_tokens": self.generated,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_accepted_per_step": self.accepted / self.steps if self.steps else None,
            # tokens each target pass yields after the prefill (1.0 = plain decoding)
            "mean_tokens_per_step": (self.generated - self.calls) / self.steps if self.steps else None,
            "accepted_histogram": {str(k): v for k, v in sorted(hist.items())},
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "draft_time_share": self.draft_seconds / busy if busy else None,
        }


def crop_cache(cache: Any, length: int) -> None:
    """Drop the cache's entries past ``length`` tokens.

    transformers 5's convention, which the engines' own caches follow: ``crop(-n)`` removes the
    last ``n`` tokens, ``get_seq_length()`` says how many there are.
    """
    if not (hasattr(cache, "crop") and hasattr(cache, "get_seq_length")):
        raise TypeError(
            f"speculative decoding needs a KV cache that can be cropped back to the accepted tokens; "
            f"{type(cache).__name__} has no crop/get_seq_length (use the default dynamic cache)"
        )
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


class PromptLookupDrafter:
    """Propose the continuation of the most recent earlier match of the last n-gram (n = max..min)."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def start(self, ids: torch.Tensor) -> None:
        pass

    def lookup(self, seq: list[int], k: int) -> list[int]:
        for n in range(min(self.ngram_max, len(seq) - 1), self.ngram_min - 1, -1):
            tail = seq[-n:]
            # most recent earlier occurrence that has at least one token after it
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    return seq[start + n : start + n + k]
        return []

    def propose(self, seqs: torch.Tensor, k: int) -> torch.Tensor:
        rows = [self.lookup(r.tolist(), k) for r in seqs]
        width = max(len(r) for r in rows)
        if width == 0:
            return seqs.new_zeros((seqs.shape[0], 0))
        # Rows with shorter proposals are padded with their last token: verification rejects
        # what is wrong, and lockstep keeps only the batch's shortest accepted prefix anyway.
        last = seqs[:, -1].tolist()
        return torch.tensor([r + [(r or [last[i]])[-1]] * (width - len(r)) for i, r in enumerate(rows)])

    def accepted(self, n_kept: int) -> None:
        pass


class ModelDrafter:
    """Greedy proposals from a draft LanguageModel with its own KV cache."""

    def __init__(self, draft):
        self.lm = draft
        self.cache = None
        self.seen = 0  # tokens of the sequence held in the draft's cache
        self.base: int | None = None  # sequence length when the pending proposals were made

    def start(self, ids: torch.Tensor) -> None:
        self.cache, self.seen, self.base = None, 0, None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.lm.model(input_ids=ids.to(self.lm.device), cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.seen += ids.shape[1]
        return out.logits[:, -1]

    @torch.inference_mode()
    def propose(self, seqs: torch.Tensor, k: int) -> torch.Tensor:
        self.base = seqs.shape[1]
        logits = self._forward(seqs[:, self.seen :])  # the tokens accepted since the last step
        out = []
        for i in range(k):
            nxt = logits.argmax(-1, keepdim=True).cpu()
            out.append(nxt)
            if i < k - 1:
                logits = self._forward(nxt)
        return torch.cat(out, dim=1)

    def accepted(self, n_kept: int) -> None:
        if self.base is None:  # no proposals this step (the last token needed none)
            return
        # The cache holds the sequence plus proposals 1..k-1; keep those that were accepted.
        keep = min(self.seen, self.base + n_kept)
        crop_cache(self.cache, keep)
        self.seen, self.base = keep, None


class SpeculativeGenerator:
    """``lm.generator`` for assisted greedy decoding (see the module docstring).

    ``verify``: "first" compares the first call's output with plain greedy decoding of the same
    input (after the timed part: the callbacks have all fired) and raises SpeculativeMismatch if
    it differs; "every" does so on every call; "none" never.
    """

    def __init__(self, drafter, k: int = 4, verify: str = "first"):
        self.drafter, self.k, self.verify = drafter, k, verify
        self.stats = SpecStats()
        self.verified_calls = 0

    @torch.inference_mode()
    def generate(self, lm, ids: torch.Tensor, n: int, on_tokens: Callable[[int], None] | None = None) -> torch.Tensor:
        out = self._speculate(lm, ids, n, on_tokens)
        if self.verify == "every" or (self.verify == "first" and self.verified_calls == 0):
            check_identical(lm, ids, out)
            self.verified_calls += 1
        return out

    @contextlib.contextmanager
    def _clock(self, lm, attr: str):
        """Add the block's wall time (device synchronised) to ``stats.<attr>``."""
        lm.synchronize()
        t0 = time.perf_counter()
        yield
        lm.synchronize()
        setattr(self.stats, attr, getattr(self.stats, attr) + time.perf_counter() - t0)

    def _speculate(self, lm, ids: torch.Tensor, n: int, on_tokens) -> torch.Tensor:
        st = self.stats
        st.calls += 1
        ids = ids.cpu()
        self.drafter.start(ids)
        # The cache may be pre-allocated: leave room for the k proposals of the last step.
        with self._clock(lm, "verify_seconds"):
            logits, cache = lm.prefill(ids, capacity=ids.shape[1] + n + self.k)
        seqs = torch.cat([ids, logits.argmax(-1, keepdim=True).cpu()], dim=1)
        cached = ids.shape[1]  # the newest token is not yet in the target's cache
        if on_tokens is not None:
            on_tokens(1)
        while seqs.shape[1] - ids.shape[1] < n:
            room = n - (seqs.shape[1] - ids.shape[1]) - 1  # proposals beyond n would be wasted
            k = min(self.k, room)
            draft = None
            if k:
                with self._clock(lm, "draft_seconds"):
                    draft = self.drafter.propose(seqs, k)
            draft = draft if draft is not None and draft.shape[1] else seqs.new_zeros((seqs.shape[0], 0))
            step_in = torch.cat([seqs[:, -1:], draft], dim=1)
            with self._clock(lm, "verify_seconds"):
                out = lm.model(input_ids=step_in.to(lm.device), cache=cache, use_cache=True)
            cache = out.cache
            greedy = out.logits.argmax(-1).cpu()  # [B, d+1]: the target's choice after each prefix
            match = (greedy[:, :-1] == draft).int().cumprod(dim=1).sum(dim=1)  # accepted per row
            m = int(match.min())  # lockstep: the batch advances by its shortest accepted prefix
            new = torch.cat([draft[:, :m], greedy[:, m : m + 1]], dim=1)
            seqs = torch.cat([seqs, new], dim=1)
            cached += 1 + m
            crop_cache(cache, cached)
            self.drafter.accepted(m)
            st.steps += 1
            st.drafted += draft.shape[1]
            st.accepted += m
            st.accepted_per_step.append(m)
            if on_tokens is not None:
                on_tokens(m + 1)
        st.generated += n
        return seqs[:, ids.shape[1] :]


def check_identical(lm, ids: torch.Tensor, got: torch.Tensor) -> None:
    """Raise SpeculativeMismatch unless ``got`` equals plain greedy decoding of ``ids``."""
    generator, lm.generator = lm.generator, None
    try:
        ref = lm.generate(ids, got.shape[1])
    finally:
        lm.generator = generator
    ref = ref.cpu()
    if torch.equal(ref, got):
        return
    row, pos = (ref != got).nonzero()[0].tolist()
    context = torch.cat([ids[row : row + 1].cpu(), ref[row : row + 1, :pos]], dim=1)
    top2 = lm.next_token_logits(context)[0].topk(2).values
    raise SpeculativeMismatch(
        f"speculative output differs from the target's greedy decoding at row {row}, token {pos}: "
        f"{got[row, pos].item()} instead of {ref[row, pos].item()} (the target's top-2 logit gap "
        f"there is {float(top2[0] - top2[1]):.3g}; a gap near 0 is a numerical near-tie between "
        f"a multi-token and a single-token pass)"
    )
