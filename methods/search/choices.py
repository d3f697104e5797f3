"""The settings a search can give one linear layer, what each stores, and how it is applied.

A choice is written as a short key, the form plans and profiles use:

- ``rtn:B:pc`` / ``rtn:B:gG``: round-to-nearest, ``B`` bits, one grid per output channel
  (``pc``) or per group of ``G`` input channels (the shared grid: fp16 scales, packed integer
  zero-points unless symmetric);
- ``magnitude:S`` / ``wanda:S``: fraction ``S`` of the weights pruned, ranked by ``|W|`` over the
  whole matrix (magnitude's default scope) or by ``|W|·‖X_j‖₂`` within each output row (Wanda);
  stored in the sparse format (bitmask + values);
- ``svd-llm:R``: the fraction ``R`` of the weight's parameters removed by SVD-LLM's truncation
  of ``W L`` (``L L^T = X^T X`` of the calibration inputs): rank ``floor((1 - R) m n / (m + n))``,
  held as two factors in the model's dtype (``[k, n]`` and ``[m, k]``), executed natively as two
  smaller linears;
- ``dense``: the weight left as it is (no stored form of its own: the harness counts the dense
  tensor).

The bytes of a choice are the bytes of the tensors its stored form holds, summed exactly as the
harness sums them for the record's effective bits (``slimbench.method.size_report``), so a plan's budget
and the record agree to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from slimbench.methods.lowrank.factorize import rank_for_ratio, truncate_transformed
from slimbench.methods.lowrank.svd_llm import CholeskyWhitening
from slimbench.methods.pruning.masks import build_mask
from slimbench.methods.pruning.sparse_format import encode_unstructured
from slimbench.methods.pruning.wanda import wanda_score
from slimbench.methods.quantization.grid import GridConfig, quantize_matrix, stored_form
from transformers.pytorch_utils import Conv1D

FAMILY_METHODS = {"quantization": ("rtn",), "pruning": ("magnitude", "wanda"), "lowrank": ("svd-llm",)}
CALIBRATED = {"wanda", "svd-llm"}  # methods whose choice needs calibration activations
SVD_LLM_DAMPING = 1e-6  # svd-llm's default first damping, so a uniform plan equals the method


@dataclass(frozen=True)
class Choice:
    method: str  # dense | rtn | magnitude | wanda | svd-llm
    bits: int | None = None
    group_size: int | None = None
    sparsity: float | None = None
    ratio: float | None = None  # svd-llm: fraction of the parameters removed

    @property
    def key(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method == "rtn":
            return f"rtn:{self.bits}:{'pc' if self.group_size is None else f'g{self.group_size}'}"
        if self.method == "svd-llm":
            return f"svd-llm:{self.ratio:g}"
        return f"{self.method}:{self.sparsity:g}"

    def applicable(self, in_features: int) -> bool:
        """Whether the choice fits a weight with ``in_features`` input channels."""
        return self.group_size is None or in_features % self.group_size == 0


FORMATS = ("'dense', 'rtn:BITS:pc', 'rtn:BITS:gGROUP' (e.g. rtn:3:g64), 'magnitude:SPARSITY', 'wanda:SPARSITY' "
           "or 'svd-llm:RATIO'")


def parse_choice(key: str) -> Choice:
    """The Choice a key names; a ValueError naming the allowed forms otherwise."""
    parts = str(key).strip().split(":")
    try:
        if parts == ["dense"]:
            return Choice("dense")
        if parts[0] == "rtn" and len(parts) == 3:
            bits = int(parts[1])
            group = None if parts[2] == "pc" else int(parts[2].removeprefix("g"))
            GridConfig(bits=bits, group_size=group)  # the grid's own range checks
            if not parts[2].startswith(("g", "pc")):
                raise ValueError
            return Choice("rtn", bits=bits, group_size=group)
        if parts[0] in ("magnitude", "wanda") and len(parts) == 2:
            s = float(parts[1])
            if not 0.0 <= s < 1.0:
                raise ValueError
            return Choice("dense") if s == 0 else Choice(parts[0], sparsity=s)
        if parts[0] == "svd-llm" and len(parts) == 2:
            r = float(parts[1])
            if not 0.0 <= r < 1.0:
                raise ValueError
            return Choice("dense") if r == 0 else Choice("svd-llm", ratio=r)
    except ValueError:
        pass
    raise ValueError(f"unknown choice {key!r}: use {FORMATS}")


def stored_nbytes(stored: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())


@torch.no_grad()
def compress_weight(
    w: torch.Tensor,
    choice: Choice,
    *,
    symmetric: bool = False,
    sq_norm: torch.Tensor | None = None,
    xtx: torch.Tensor | None = None,
    transposed: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(the [out, in] weight the choice leaves, its stored form; None for ``dense``).

    ``sq_norm``: per input channel sum of squared calibration activations (Wanda's statistic);
    ``xtx``: their full ``X^T X`` (SVD-LLM's).
    """
    if choice.method == "dense":
        return w, None
    if choice.method == "svd-llm":
        if xtx is None:
            raise ValueError("an svd-llm choice needs the layer's calibration X^T X")
        up, down = svd_llm_factors(w, choice.ratio, xtx)
        return (up @ down).to(w.dtype), {"up": up.to(w.dtype), "down": down.to(w.dtype)}
    if choice.method == "rtn":
        codes, deq, p = quantize_matrix(w, GridConfig(bits=choice.bits, group_size=choice.group_size,
                                                      symmetric=symmetric))
        return deq.to(w.dtype), stored_form(codes, p)
    if choice.method == "magnitude":
        keep = build_mask(w.abs(), choice.sparsity, None, "layer")
    elif choice.method == "wanda":
        if sq_norm is None:
            raise ValueError("a wanda choice needs the layer's calibration activation norms")
        keep = build_mask(wanda_score(w, sq_norm.float().to(w.device)), choice.sparsity, None, "row")
    else:
        raise ValueError(f"unknown choice method {choice.method!r}")
    pruned = w * keep
    return pruned, encode_unstructured(pruned, transposed)


def svd_llm_factors(w: torch.Tensor, ratio: float, xtx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's rank-k factors ([m, k], [k, n], float64) of ``w`` whitened by ``xtx``, as the
    `svd-llm` method computes them."""
    m, n = w.shape
    chol, undo, _ = CholeskyWhitening(SVD_LLM_DAMPING).transform({"xtx": xtx})
    _, up, down = truncate_transformed(w, chol, undo, rank_for_ratio(m, n, ratio))
    return up, down


def choice_nbytes(w: torch.Tensor, choice: Choice, **kw) -> int:
    """Bytes the harness will count for this weight under this choice."""
    _, stored = compress_weight(w, choice, **kw)
    return w.numel() * w.element_size() if stored is None else stored_nbytes(stored)


def is_transposed(mod: torch.nn.Module) -> bool:
    return isinstance(mod, Conv1D)
