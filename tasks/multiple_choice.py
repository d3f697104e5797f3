"""The multiple-choice engine shared by every zero-shot accuracy task (no TASK here).

An example is a list of (context, continuation) requests, one per choice, and the index of
the gold choice. Each choice is scored by ``lm.loglikelihood`` (the summed log-probability of
its continuation tokens); with lm-evaluation-harness' semantics:

- ``acc``: 1 if the choice with the highest log-likelihood is the gold one (ties: the first).
- ``acc_norm``: the same after dividing each log-likelihood by the number of *characters* of
  the choice text (without the delimiter that joins it to the context), so long choices are
  not penalised for having more tokens.

Speed: all requests of all examples go to ``lm.loglikelihood`` in one call, which runs each
distinct context once and scores every continuation of it on a copy of its KV cache (one
padded batch), and batches the remaining requests longest first. ``score_plain`` is the
one-request-at-a-time reference: the tests check both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slimbench.measure import stats
from slimbench.task import Metric


@dataclass(frozen=True)
class Example:
    id: str
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    choice_chars: tuple[int, ...]  # characters of each choice, for acc_norm
    gold: int

    @classmethod
    def from_choices(cls, id: str, context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> Example:
        """The usual shape: one context, several choices joined to it by ``delimiter``."""
        if not 0 <= gold < len(choices):
            raise ValueError(f"example {id}: gold index {gold} outside the {len(choices)} choices")
        return cls(id, tuple((context, delimiter + c) for c in choices), tuple(len(c) for c in choices), gold)


@dataclass
class Scored:
    """Per-example results, in example order."""

    ids: list[str]
    loglikelihoods: list[list[float]]
    is_greedy: list[list[bool]]
    acc: list[float]
    acc_norm: list[float]


def _decide(examples: Sequence[Example], flat: list[tuple[float, bool]]) -> Scored:
    out = Scored([], [], [], [], [])
    pos = 0
    for ex in examples:
        chunk = flat[pos : pos + len(ex.requests)]
        pos += len(ex.requests)
        lls = np.array([ll for ll, _ in chunk])
        chars = np.array(ex.choice_chars, dtype=np.float64)
        out.ids.append(ex.id)
        out.loglikelihoods.append(lls.tolist())
        out.is_greedy.append([g for _, g in chunk])
        out.acc.append(float(int(np.argmax(lls)) == ex.gold))
        out.acc_norm.append(float(int(np.argmax(lls / np.maximum(chars, 1.0))) == ex.gold))
    return out


def score(lm, examples: Sequence[Example], *, batch_size: int = 16) -> Scored:
    """Score every example, sharing contexts and batching (the fast path)."""
    flat = lm.loglikelihood([r for ex in examples for r in ex.requests], batch_size=batch_size, share_context=True)
    return _decide(examples, flat)


def score_plain(lm, examples: Sequence[Example]) -> Scored:
    """Reference: one request per forward pass, no sharing, no batching."""
    flat = [
        lm.loglikelihood([r], batch_size=1, share_context=False)[0] for ex in examples for r in ex.requests
    ]
    return _decide(examples, flat)


def metric(scores: Sequence[float], unit: str = "fraction", higher_is_better: bool = True, seed: int = 0) -> Metric:
    """The mean of per-example scores, with stderr and a seeded 95% bootstrap interval as its spread."""
    spread = stats.summarize(scores, seed=seed)
    return Metric(spread.pop("value"), unit, higher_is_better, spread=spread)


def accuracy_metrics(scored: Scored, seed: int = 0) -> dict[str, Metric]:
    return {"acc": metric(scored.acc, seed=seed), "acc_norm": metric(scored.acc_norm, seed=seed)}


def per_example(scored: Scored) -> dict[str, list]:
    """What a record keeps so a report can pair this run with the baseline's, example by example."""
    return {"id": scored.ids, "acc": scored.acc, "acc_norm": scored.acc_norm, "loglikelihoods": scored.loglikelihoods}
