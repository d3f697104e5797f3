"""A linear weight's integer grid as a method stored it, and what each target format makes of it.

``LinearGrid`` is the exporter's view of one quantized weight: unsigned integer codes
``[out, in]``, an fp16 scale and an integer zero-point per (row, group), and which group each
input column belongs to (contiguous runs, or scattered by act-order). The weight it stands for
is ``scale[r, g(c)] * (code[r, c] - zero[r, g(c)])``. Callers build it from whatever holds the
grid (a method's stored form, a packed layer); this module does not know methods.

Every export then measures instead of assuming: ``change(original, exported)`` compares the
weight a format decodes to (by the target library's own dequantizer where one exists) with
the weight SlimBench's model holds, so a tensor is called ``exact`` only if every value is
bit-for-bit equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinearGrid:
    codes: torch.Tensor  # [out, in] integer-valued (uint8)
    scale: torch.Tensor  # [out, groups] float32 holding fp16 values
    zero: torch.Tensor  # [out, groups] integer-valued float32
    cols: torch.Tensor  # [in] long: the group of each input column
    bits: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.scale[:, self.cols] * (self.codes.float() - self.zero[:, self.cols])

    def contiguous_group(self) -> int | None:
        """The group size if groups are contiguous runs of equal length (per channel: ``in``)."""
        groups, n = self.scale.shape[1], self.codes.shape[1]
        if n % groups:
            return None
        size = n // groups
        return size if torch.equal(self.cols, torch.arange(n) // size) else None

    def rows(self, order: torch.Tensor) -> LinearGrid:
        """The same grid with its output rows reordered (a GGUF q/k permutation)."""
        return LinearGrid(self.codes[order], self.scale[order], self.zero[order], self.cols, self.bits, self.symmetric)

    def blocks(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per block of ``size`` input columns: (codes [out, nb, size], scale [out, nb], zero [out, nb]),
        or None when a block would straddle two groups (then no blocked format expresses the grid)."""
        out_f, in_f = self.codes.shape
        if in_f % size:
            return None
        g = self.cols.view(-1, size)
        if not bool((g == g[:, :1]).all()):
            return None
        gi = g[:, 0]
        return self.codes.view(out_f, -1, size), self.scale[:, gi], self.zero[:, gi]


@dataclass
class Int8Layer:
    """A weight held as int8 codes with one scale per output row, executed on int8 activations
    quantized at run time (W8A8): ``activations`` is ``token`` (one scale per token) or ``tensor``."""

    qweight: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32
    activations: str
    act_symmetric: bool
    note: str = ""

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


def sparsity(w: torch.Tensor) -> dict[str, float | str]:
    """The zeros a pruned weight holds (fraction of exact zeros) and the N:M pattern it keeps along
    its input dimension (2:4, 4:8 or none), for 2-D weights with any zeros; {} otherwise."""
    if w.dim() != 2:
        return {}
    zero = w == 0
    frac = float(zero.float().mean())
    if frac < 0.01:  # a dense weight's stray exact zeros say nothing about pruning
        return {}
    out: dict[str, float | str] = {"sparsity": frac}
    for n, m in ((2, 4), (4, 8)):
        if w.shape[1] % m == 0 and bool(((~zero).view(w.shape[0], -1, m).sum(-1) <= n).all()):
            out["pattern"] = f"{n}:{m}"
            break
    return out


def change(original: torch.Tensor, exported: torch.Tensor) -> dict[str, float | bool]:
    """How far the exported weight moved: max |Δ|, RMS(Δ) / RMS(w), and bit-exactness."""
    a, b = original.detach().float().reshape(-1), exported.detach().float().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"exported tensor has {b.numel()} values, the original {a.numel()}")
    d = b - a
    rms = float(a.pow(2).mean().sqrt())
    return {
        "exact": bool(torch.equal(a, b)),
        "max_abs_change": float(d.abs().max()) if d.numel() else 0.0,
        "rel_rms_change": float(d.pow(2).mean().sqrt()) / rms if rms > 0 else float(d.abs().max() > 0),
    }


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of the grid's LSB-first bit packing (``bits`` bits per value)."""
    bitplane = (packed.to(torch.uint8).unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bitplane = bitplane.reshape(-1)[: numel * bits].view(numel, bits)
    return (bitplane << torch.arange(bits, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def grid_from_parts(parts: dict[str, torch.Tensor], out_f: int, in_f: int) -> LinearGrid | None:
    """A stored form ``{qweight (bit-packed codes), scales, [qzeros], [g_idx]}`` as a grid; None
    for any other form (sparse, AWQ with an input scale, a packed kernel layout)."""
    if set(parts) - {"qweight", "scales", "qzeros", "g_idx"} or "qweight" not in parts or "scales" not in parts:
        return None
    numel = out_f * in_f
    bits = [b for b in range(1, 9) if (numel * b + 7) // 8 == parts["qweight"].numel()]
    if len(bits) != 1 or parts["qweight"].dim() != 1:
        return None
    b = bits[0]
    scale = parts["scales"].float().reshape(out_f, -1)
    groups = scale.shape[1]
    if "qzeros" in parts:
        zero = unpack_bits(parts["qzeros"], b, scale.numel()).float().view(out_f, groups)
    else:
        zero = torch.full_like(scale, float(2 ** (b - 1)))
    if "g_idx" in parts:
        cols = parts["g_idx"].long()
    elif in_f % groups:
        return None
    else:
        cols = torch.arange(in_f) // (in_f // groups)
    codes = unpack_bits(parts["qweight"], b, numel).view(out_f, in_f)
    return LinearGrid(codes, scale, zero, cols, b, "qzeros" not in parts)
