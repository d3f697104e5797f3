"""Hadamard matrices of the widths real models have, and a fast transform with them.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``, so ``H / √n`` is
orthogonal. QuaRot, SpinQuant and QuIP# rotate activations and weights with one (times a random
±1 diagonal) because it spreads an outlier over every coordinate and costs ``O(n log n)``.
Powers of two come from Sylvester's doubling. Other widths need a known matrix of a non-power-
of-two order ``m`` and a Kronecker product ``H_m ⊗ H_{n/m}`` with ``n/m`` a power of two, as
QuaRot does; the ones here are built, not tabulated:

- Paley I: ``q`` prime, ``q ≡ 3 (mod 4)`` gives order ``q + 1`` (12, 20, 24, 32, 44, 48, 60, ...);
- Paley II: ``q`` prime, ``q ≡ 1 (mod 4)`` gives order ``2(q + 1)`` (12, 28, 36, 60, 76, ...);
- and products of two of those (e.g. 12 · 12 = 144).

So SmolLM2's 576 = 36 · 16 (Paley II, q = 17), its 1,536 = 12 · 128 and 192 = 12 · 16, Gemma 3's
640 = 20 · 32 (Paley I, q = 19). A width no construction here covers (any odd width, 100 = 4 · 25,
...) raises ``ValueError`` with the reason, at validation time.

The transform (:func:`hadamard_matmul`, written in PyTorch: the CUDA-only fast-hadamard-transform
library does not run on this CPU) applies ``H_m`` and the power-of-two part, itself split into
Sylvester factors of at most 128 (``H_2048 = H_16 ⊗ H_128``), as one small dense matmul per
factor: ``n · (m + Σ c_i)`` multiply-adds per vector instead of ``n²``, in a few kernel calls.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# Largest non-power-of-two base order searched (Paley constructions from primes below it).
MAX_BASE = 260


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _legendre(q: int) -> torch.Tensor:
    """χ(0..q-1): the quadratic character mod a prime q (0 at 0, +1 on squares, -1 otherwise)."""
    chi = -torch.ones(q, dtype=torch.int64)
    chi[0] = 0
    chi[torch.tensor(sorted({(x * x) % q for x in range(1, q)}))] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _legendre(q)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4): H = I + S, S skew with a Jacobsthal core."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4), from the symmetric conference matrix."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, 1], [1, -1]])
    b = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=1)
def base_orders() -> dict[int, str]:
    """{order: how it is built} for the non-power-of-two orders up to MAX_BASE."""
    out: dict[int, str] = {}
    for q in range(3, MAX_BASE):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and not _is_pow2(q + 1):
            out.setdefault(q + 1, f"paley1:{q}")
        if q % 4 == 1 and 2 * (q + 1) <= MAX_BASE and not _is_pow2(2 * (q + 1)):
            out.setdefault(2 * (q + 1), f"paley2:{q}")
    return dict(sorted(out.items()))


def _build(recipe: str) -> torch.Tensor:
    kind, _, q = recipe.partition(":")
    return paley1(int(q)) if kind == "paley1" else paley2(int(q))


@dataclass(frozen=True)
class HadamardPlan:
    """``H_n = H_m ⊗ H_p`` with ``p`` a power of two; ``m = 1`` for a power-of-two ``n``."""

    n: int
    m: int
    p: int
    recipe: str  # how H_m is built ("sylvester", "paley1:19", "paley2:17*paley1:11", ...)

    def dense_factor(self) -> torch.Tensor:
        """H_m as a float32 ±1 matrix."""
        if self.m == 1:
            return torch.ones(1, 1)
        parts = [_build(r) for r in self.recipe.split("*")]
        h = parts[0]
        for part in parts[1:]:
            h = torch.kron(h, part)
        return h.float()

    def matrix(self) -> torch.Tensor:
        """The full ±1 matrix H_n (float32), for tests and small widths."""
        return torch.kron(self.dense_factor(), sylvester(self.p).float())


@functools.lru_cache(maxsize=256)
def hadamard_plan(n: int) -> HadamardPlan:
    """How to build a Hadamard matrix of order ``n``; ValueError if no construction here covers it."""
    if n < 1:
        raise ValueError(f"width {n}: a Hadamard matrix needs a positive order")
    if _is_pow2(n):
        return HadamardPlan(n, 1, n, "sylvester")
    bases = base_orders()
    for m, recipe in bases.items():  # smallest dense factor first: the cheapest transform
        if n % m == 0 and _is_pow2(n // m):
            return HadamardPlan(n, m, n // m, recipe)
    for m1, r1 in bases.items():
        for m2, r2 in bases.items():
            if m2 >= m1 and n % (m1 * m2) == 0 and _is_pow2(n // (m1 * m2)):
                return HadamardPlan(n, m1 * m2, n // (m1 * m2), f"{r1}*{r2}")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    why = ("a Hadamard matrix exists only for orders 1, 2 and multiples of 4" if n > 2 and n % 4 else
           f"no known order m <= {MAX_BASE} (Paley I/II from primes, or a product of two) with n/m a power of two")
    raise ValueError(f"width {n} = 2^{int(math.log2(n // odd))} x {odd}: no Hadamard construction covers it ({why})")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) along the last dim (a power of two)."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return x


@functools.lru_cache(maxsize=32)
def _sylvester_float(p: int) -> torch.Tensor:
    return sylvester(p).float()


def _chunks(p: int, largest: int = 128) -> list[int]:
    """Powers of two <= ``largest`` whose product is ``p``: H_p = H_c1 ⊗ H_c2 ⊗ ... (Sylvester's order)."""
    out = []
    while p > largest:
        out.append(largest)
        p //= largest
    return [p, *out] if p > 1 else out


def hadamard_matmul(x: torch.Tensor, plan: HadamardPlan, factor: torch.Tensor | None = None,
                    transpose: bool = False) -> torch.Tensor:
    """``x @ H_n / √n`` (or ``x @ H_nᵀ / √n``) over the last dim, in ``n · (m + Σ c_i)`` multiply-adds.

    ``H_n = H_m ⊗ H_c1 ⊗ H_c2 ...`` with Sylvester factors of at most 128: each factor is one small
    dense matmul over its own axis (a handful of kernel calls, which at one token beats the
    ``log2 p`` passes of a butterfly; :func:`fwht` is the butterfly, kept as the reference).
    """
    n, m, p = plan.n, plan.m, plan.p
    if x.shape[-1] != n:
        raise ValueError(f"last dim {x.shape[-1]} != Hadamard order {n}")
    shape = x.shape
    chunks = _chunks(p)
    y = x.reshape(-1, m, *chunks)
    for axis, c in enumerate(chunks, start=2):  # Sylvester factors are symmetric
        y = torch.movedim(torch.movedim(y, axis, -1) @ _sylvester_float(c).to(y.dtype), -1, axis)
    if m > 1:
        a = plan.dense_factor() if factor is None else factor
        a = a.to(y.dtype)
        y = torch.movedim(torch.movedim(y, 1, -1) @ (a.t() if transpose else a), -1, 1)
    return (y * (1.0 / math.sqrt(n))).reshape(shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A seeded ±1 vector (float32)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
