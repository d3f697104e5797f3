"""Calibration data, and the guard on its budget.

Sampling, like GPTQ's C4 sampler: the split's documents are joined with "\\n\\n" and
tokenized once, then ``n`` start positions are drawn with ``random.Random(seed)`` and a window
of ``seqlen`` tokens is cut at each. The calibration split shares no document with validation
or test.

The budget guard: a calibration-based method declares what its algorithm needs from the
budget (``Method.calibration_need``, one of :data:`NEEDS` or a :class:`CalibrationNeed`), and
the harness compares ``calib_samples x calib_seqlen`` with the layers the method will see,
before any work: below a hard floor the cell is refused with the reason; below what the
algorithm needs it runs, with a warning in ``MethodReport.warnings`` (the record and the
leaderboard show it). ``validate`` runs the same guard on the model's shapes alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from slimbench.config import Config
from slimbench.registry import CORPORA
from slimbench.zoo.corpora import encode_split


class CalibrationConfig(Config):
    """Fields every calibration-based method config inherits (part of the method's identity)."""

    calib_corpus: str = Field("shakespeare", description="corpus whose calibration split is sampled")
    calib_samples: int = Field(128, ge=1, le=100000, description="calibration sequences")
    calib_seqlen: int = Field(512, ge=8, le=131072, description="tokens per calibration sequence")
    calib_seed: int = Field(0, description="seed of the segment sampler")

    @property
    def calib_tokens(self) -> int:
        return self.calib_samples * self.calib_seqlen


def calibration_tokens(lm, corpus: str) -> list[int]:
    return encode_split(lm, corpus, "calibration")


def sample_calibration(lm, cfg: CalibrationConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """[calib_samples, calib_seqlen] token ids and the record of how they were drawn."""
    ids = calibration_tokens(lm, cfg.calib_corpus)
    if len(ids) <= cfg.calib_seqlen:
        raise ValueError(f"calibration split has {len(ids)} tokens, not more than calib_seqlen {cfg.calib_seqlen}")
    rng = random.Random(cfg.calib_seed)
    starts = [rng.randint(0, len(ids) - cfg.calib_seqlen - 1) for _ in range(cfg.calib_samples)]
    batch = torch.tensor([ids[s : s + cfg.calib_seqlen] for s in starts], dtype=torch.long)
    info = {
        "corpus": cfg.calib_corpus,
        "split": "calibration",
        "samples": cfg.calib_samples,
        "seqlen": cfg.calib_seqlen,
        "seed": cfg.calib_seed,
        "tokens": batch.numel(),
        "data_sha256": CORPORA.get(cfg.calib_corpus).manifest("calibration")["sha256"],
    }
    return batch, info


@torch.no_grad()
def feed_linear_inputs(model: torch.nn.Module, linears: Iterable[tuple[str, torch.nn.Module]], rows: torch.Tensor,
                       add: Callable[[str, torch.Tensor], None], device: Any = "cpu") -> None:
    """Run each row of token ids through ``model`` once (no KV cache) and hand every listed
    linear's input, as ``[tokens, in_features]``, to ``add(key, x)``: the activation statistics
    a method or a diagnostic accumulates (squared means, Gram matrices)."""
    hooks = [mod.register_forward_pre_hook(lambda _m, args, key=key: add(key, args[0].reshape(-1, args[0].shape[-1])))
             for key, mod in linears]
    try:
        for row in rows:
            model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()


# -- the budget guard ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationNeed:
    """What an algorithm needs from ``calib_samples x calib_seqlen`` calibration tokens.

    ``per_input``: tokens per input channel of the widest linear layer it calibrates, below
    which it is warned about (1.0: the ``X Xᵀ`` of that layer's inputs has full rank only with
    at least as many tokens as inputs). ``floor_per_input``: below this the cell is refused.
    ``min_tokens``: tokens below which its statistics are unreliable (warning). ``why``: the
    algorithm's reason, quoted in the message.
    """

    per_input: float = 0.0
    floor_per_input: float = 0.0
    min_tokens: int = 0
    why: str = ""


NEEDS: dict[str, CalibrationNeed] = {
    # GPTQ, SparseGPT, SVD-LLM: they invert (or factor) H = X Xᵀ over a layer's inputs. With
    # fewer tokens than inputs H is singular and the damping term, not the data, decides the
    # update: GPTQ at 3 bits on SmolLM2 with 1,024 tokens for down_proj's 1,536 inputs came out
    # worse than plain rounding. Below an eighth of the inputs the result says nothing about
    # the method, so it is refused.
    "hessian": CalibrationNeed(
        per_input=1.0,
        floor_per_input=0.125,
        why="its Hessian X Xᵀ of a layer's inputs has rank at most the number of tokens",
    ),
    # Wanda (input norms), AWQ (mean |x| and a loss-scored scale search), SmoothQuant (max |x|),
    # ASVD, structured importance: per-channel statistics. Wanda reports stable results from a
    # single 2,048-token sample; with fewer tokens, rare outlier channels go unseen.
    "activation-statistics": CalibrationNeed(
        min_tokens=2048,
        why="per-channel activation statistics from fewer tokens miss rare outlier channels",
    ),
    # Fine-tuning and distillation: the budget is the training set; any size is a valid
    # experiment (the method reports the tokens it trained on).
    "training": CalibrationNeed(),
}
DEFAULT_NEED = "activation-statistics"


def resolve_need(method: Any, cfg: Any) -> CalibrationNeed | None:
    """The method's declared need for this config (None: this config draws no data)."""
    need = method.calibration_need if method.calibration_need is not None else DEFAULT_NEED
    if callable(need) and not isinstance(need, CalibrationNeed):
        need = need(cfg)
    if need is None or isinstance(need, CalibrationNeed):
        return need
    if need not in NEEDS:
        raise ValueError(f"method {method.name}: calibration_need {need!r} is not one of {sorted(NEEDS)}")
    return NEEDS[need]


def widest_input(model: torch.nn.Module) -> tuple[str, int]:
    """(name, input width) of the widest linear layer a method calibrates (lm_head excluded).

    Reads shapes only, so it works on a weightless (meta) skeleton of the model.
    """
    from slimbench.modeling import get_weight, iter_linears

    widths = [(name, int(get_weight(mod).shape[1])) for name, mod in iter_linears(model)]
    return max(widths, key=lambda w: w[1], default=("", 0))


def max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def budget_problems(model: torch.nn.Module, cfg: CalibrationConfig, method: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings) of ``cfg``'s calibration budget against ``model``'s layers."""
    need = resolve_need(method, cfg)
    if need is None:
        return [], []
    errors, warnings = [], []
    positions = max_positions(model)
    if positions is not None and cfg.calib_seqlen > positions:
        errors.append(f"calib_seqlen {cfg.calib_seqlen} exceeds the model's {positions} positions")
    tokens = cfg.calib_tokens
    budget = f"{cfg.calib_samples} x {cfg.calib_seqlen} = {tokens:,} calibration tokens"
    name, width = widest_input(model)
    if need.per_input and width:
        wanted = math.ceil(need.per_input * width)
        floor = math.ceil(need.floor_per_input * width)
        samples = math.ceil(wanted / cfg.calib_seqlen)
        hint = f"raise calib_samples to at least {samples} at calib_seqlen {cfg.calib_seqlen}"
        if tokens < floor:
            errors.append(
                f"{budget} is below the floor of {floor:,} ({need.floor_per_input:g} per input of {name}, "
                f"{width:,} inputs): {need.why}; {hint}"
            )
        elif tokens < wanted:
            warnings.append(
                f"{budget}, fewer than the {width:,} inputs of {name}: {need.why}, so the result may be worse "
                f"than without calibration; {hint}"
            )
    if tokens < need.min_tokens:
        warnings.append(f"{budget}, fewer than {need.min_tokens:,}: {need.why}")
    return errors, warnings


def budget_warnings(model: torch.nn.Module, cfg: CalibrationConfig, method: Any) -> list[str]:
    """Warnings for the method's report; raises ValueError (the cell's failure) below the floor."""
    errors, warnings = budget_problems(model, cfg, method)
    if errors:
        raise ValueError(f"method {method.name}: " + "; ".join(errors))
    return [f"calibration budget: {w}" for w in warnings]

