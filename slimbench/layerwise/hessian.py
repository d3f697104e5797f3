"""Gram (Hessian) products ``xᵀx`` of a layer's inputs, shared between linears fed the same tensor."""

from __future__ import annotations

import torch

from slimbench.layerwise.bits import bits
from slimbench.layerwise.variant import shortcut_enabled

TRI_BLOCK = 256  # rows of xᵀ per block of the upper-triangular Gram product
_TRI_OK: dict[tuple, bool] = {}  # (shape, strides, dtype, device, threads) -> the blocks give the same bits


def gram(x: torch.Tensor, buffers: dict | None = None) -> tuple[torch.Tensor, bool]:
    """``(xᵀx, upper_only)`` for ``x`` [tokens, n].

    For wide ``x`` only the blocks of rows on and above the diagonal are multiplied, written in
    place into a zeroed buffer (about 0.55 of the full product's time at n = 1536, 1 thread):
    the result is exact on and above the diagonal and zero below (``upper_only``); a sum of such
    products is completed by :func:`symmetric_from_upper`. Whether the blocks give exactly the
    bits of the full product (and the full product is exactly symmetric) depends on how the BLAS
    orders its sums for each shape, so it is checked once per (shape, strides, dtype, device,
    threads) against the full product, and the blocks are used only where identical (with this
    machine's MKL they were, for every shape tried). ``buffers`` keeps the zeroed buffers.
    """
    n = x.shape[1]
    if n < 4 * TRI_BLOCK or not shortcut_enabled("triangle"):
        return x.t() @ x, False
    key = (tuple(x.shape), x.stride(), x.dtype, x.device, torch.get_num_threads())
    ok = _TRI_OK.get(key)
    if ok is None:
        full = x.t() @ x
        upper = _upper(x, torch.zeros(n, n, dtype=x.dtype, device=x.device))
        _TRI_OK[key] = (torch.equal(bits(torch.triu(upper)), bits(torch.triu(full)))
                        and torch.equal(bits(full), bits(full.t().contiguous())))
        return full, False
    if not ok:
        return x.t() @ x, False
    buffers = {} if buffers is None else buffers
    buf = buffers.get((n, x.dtype, x.device))
    if buf is None:  # zeroed once: only the upper blocks are ever written
        buf = buffers[(n, x.dtype, x.device)] = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    return _upper(x, buf), True


def _upper(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n, b = x.shape[1], TRI_BLOCK
    for i in range(0, n, b):  # rows i..i+b, columns i.. (the diagonal square included)
        torch.mm(x[:, i : i + b].t(), x[:, i:], out=out[i : i + b, i:])
    return out


def symmetric_from_upper(h: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``h``'s: bits copied."""
    upper = torch.ones(h.shape, dtype=torch.bool, device=h.device).triu()
    return torch.where(upper, h, h.t())


class SharedGram:
    """``x̃ᵀx̃`` with ``x̃ = x·scale``, computed once for successive linears fed the same input.

    q/k/v (and gate/up) receive one and the same normed tensor, so a Hessian-streaming
    compressor can reuse the product the previous linear computed: it is a pure function of
    (input bits, scale), so reusing it is bit-identical to recomputing it. The input is held
    until the next call, so its memory cannot be recycled under an equal ``data_ptr``.
    """

    def __init__(self) -> None:
        self.inp: torch.Tensor | None = None
        self.key: tuple = ()
        self.value: tuple[torch.Tensor, bool] | None = None
        self.buffers: dict = {}
        self.reused = 0

    def product(self, inp: torch.Tensor, scale: float) -> tuple[torch.Tensor, bool]:
        """:func:`gram` of ``inp·scale``: (product, upper_only). Add it to the running sum at
        once: the next call may overwrite it."""
        key = (inp.data_ptr(), inp.shape, inp.stride(), inp.dtype, inp.device, inp._version, scale)
        if self.inp is not None and key == self.key and shortcut_enabled("share"):
            self.reused += 1
            return self.value
        x = inp.float() * scale
        self.inp, self.key, self.value = inp, key, gram(x, self.buffers)
        return self.value


class HessianStream:
    """A layer-wise compressor's running ``H = 2/n Σ x xᵀ`` over its linear's calibration inputs
    (GPTQ's ``add_batch``, bit for bit the reference's running sum), for the loop's
    ``add_batch`` hook. Subclasses call :meth:`start_hessian` in ``__init__``."""

    needs_output = False

    def start_hessian(self, cols: int, gram: SharedGram | None = None) -> None:
        self.h, self.n = torch.zeros(cols, cols), 0
        self.gram = gram or SharedGram()  # shared across a layer's linears: q/k/v reuse one product
        self.upper_only = False  # some products filled only the upper triangle (see gram)

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None) -> None:
        t = inp.shape[0]
        self.h *= self.n / (self.n + t)
        self.n += t
        prod, upper_only = self.gram.product(inp, (2 / self.n) ** 0.5)
        self.h += prod
        self.upper_only |= upper_only

    def hessian(self) -> torch.Tensor:
        """The streamed ``2/n Σ x xᵀ`` as a full symmetric matrix."""
        return symmetric_from_upper(self.h) if self.upper_only else self.h
