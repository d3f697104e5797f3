"""The E8P codebook of QuIP# (Tseng et al., 2024): 2^16 points of the E8 lattice (+ 1/4), 2 bits per weight.

Built from its definition (not from a table): ``D8^ = (Z + 1/2)^8`` vectors with an even
coordinate sum; the absolute values of its points of squared norm <= 10 give 227 patterns
(entries 1/2, 3/2, 5/2); 29 patterns of squared norm 12 (five 3/2, three 1/2) bring them to 256.
A codeword is ``s ⊙ a ± 1/4`` for a pattern ``a`` and signs ``s`` such that ``s ⊙ a`` stays in
``D8^`` (its coordinate sum even: 7 free sign bits, the 8th follows), and
the shift: 256 · 128 · 2 = 2^16 codewords, all in E8 + 1/4, addressed by 16 bits per 8 weights.

Which 29 of the 56 norm-12 patterns: the first 29 in lexicographic order of the positions of
their three 1/2 entries (QuIP#'s released table makes its own choice of 29; the two codebooks
share the other 2^16 - 29·2^8 points).

Nearest codeword without searching 65,536 points: for each shift and each of the 256 patterns,
the best signs are those of ``x``; if they break the parity, flipping the coordinate with the
smallest ``4 |x_i| a_i`` is optimal. That is a [N, 256] search, tested equal to brute force.
"""

from __future__ import annotations

import functools
import itertools

import torch

DIM = 8


@functools.lru_cache(maxsize=1)
def abs_patterns() -> torch.Tensor:
    """[256, 8] float32: the 227 norm² <= 10 patterns of D8^ then the 29 norm² = 12 ones."""
    vals = (0.5, 1.5, 2.5)
    small = [a for a in itertools.product(vals, repeat=DIM) if sum(v * v for v in a) <= 10]
    extra = []
    for halves in itertools.combinations(range(DIM), 3):  # positions of the three 1/2 entries
        extra.append(tuple(0.5 if i in halves else 1.5 for i in range(DIM)))
        if len(extra) == 29:
            break
    pats = torch.tensor(sorted(small) + extra, dtype=torch.float32)
    assert pats.shape == (256, DIM), pats.shape
    return pats


def _parity_odd(a_sum: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Whether Σ s_i a_i is odd: Σ a_i + (number of negative signs), mod 2 (2 a_i is odd)."""
    return (a_sum.round().long() + negatives.long()) % 2 == 1


@functools.lru_cache(maxsize=1)
def _pattern_odd() -> torch.Tensor:
    """[256] bool: whether Σ a_i is odd (then an odd number of negative signs makes Σ s_i a_i even)."""
    return abs_patterns().sum(1).round().long() % 2 == 1


@functools.lru_cache(maxsize=1)
def codebook() -> torch.Tensor:
    """[65536, 8] float32: codeword of every 16-bit index ``pattern << 8 | shift << 7 | signs(0..6)``."""
    idx = torch.arange(1 << 16)
    return decode(idx)


def decode(idx: torch.Tensor) -> torch.Tensor:
    """Codewords of 16-bit indices (any shape) -> [..., 8]."""
    idx = idx.long() & 0xFFFF
    pats = abs_patterns()[idx >> 8]
    shift = torch.where(((idx >> 7) & 1).bool(), -0.25, 0.25)
    neg = ((idx.unsqueeze(-1) >> torch.arange(7)) & 1).bool()  # coordinates 0..6
    odd7 = _parity_odd(abs_patterns().sum(1)[idx >> 8], neg.sum(-1))  # the 8th sign restores even parity
    signs = torch.cat([neg, odd7.unsqueeze(-1)], -1)
    return torch.where(signs, -pats, pats) + shift.unsqueeze(-1)


def _best_for_shift(y: torch.Tensor, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distance, 16-bit code without the shift bit) of the nearest ``s ⊙ a`` to each row of y.

    The parity penalty (``min_i 4 |y_i| a_i`` for patterns whose matching signs are odd) is
    computed for the ``k`` odd patterns nearest before penalty; rows where a pattern beyond those
    could still win (its unpenalised distance is below the best found) are redone over all 256.
    """
    pats = abs_patterns()
    ay, neg = y.abs(), y < 0
    d0 = ay.square().sum(1, keepdim=True) - 2 * ay @ pats.t() + pats.square().sum(1)  # [n, 256]
    odd = _pattern_odd().unsqueeze(0) ^ (neg.sum(1, keepdim=True) % 2 == 1)  # parity of Σ s_i a_i
    inf = torch.tensor(float("inf"))
    best_even, even_idx = torch.where(odd, inf, d0).min(1)
    cand_d, cand = torch.where(odd, d0, inf).topk(k, dim=1, largest=False)  # [n, k]
    cost = 4 * ay.unsqueeze(1) * pats[cand]  # [n, k, 8]
    pen, where = cost.min(-1)
    tot = cand_d + pen
    best_odd, j = tot.min(1)
    # exactness: an odd pattern outside the k has d0 >= cand_d[:, -1]; redo rows where that could win
    redo = cand_d[:, -1] < torch.minimum(best_even, best_odd)
    if redo.any():
        r = redo.nonzero()[:, 0]
        full_pen, full_where = (4 * ay[r].unsqueeze(1) * pats.unsqueeze(0)).min(-1)
        full = torch.where(odd[r], d0[r] + full_pen, inf)
        best_odd[r], jj = full.min(1)
        cand = cand.clone()
        where = where.clone()
        j = j.clone()
        cand[r, 0], where[r, 0], j[r] = jj, full_where.gather(1, jj[:, None])[:, 0], 0
    odd_pat = cand.gather(1, j[:, None])[:, 0]
    odd_at = where.gather(1, j[:, None])[:, 0]
    use_odd = best_odd < best_even
    a_idx = torch.where(use_odd, odd_pat, even_idx)
    signs = neg.clone()
    rows = use_odd.nonzero()[:, 0]
    signs[rows, odd_at[rows]] = ~signs[rows, odd_at[rows]]
    code = (a_idx << 8) | (signs[:, :7].long() << torch.arange(7)).sum(1)
    return torch.minimum(best_even, best_odd), code


def nearest(x: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """16-bit indices (int64) of the nearest codewords to the rows of x [N, 8]."""
    out = torch.empty(x.shape[0], dtype=torch.long)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk].float()
        d_plus, c_plus = _best_for_shift(xs - 0.25)
        d_minus, c_minus = _best_for_shift(xs + 0.25)
        out[s:s + chunk] = torch.where(d_minus < d_plus, c_minus | (1 << 7), c_plus)
    return out
