"""The uniform quantization grid shared by every weight quantizer (RTN, GPTQ, AWQ, ...).

Min-max asymmetric (the GPTQ/RTN default) or symmetric, per output row or per group of
``group_size`` consecutive input channels. Scales are stored in fp16, and quantizers round
with the fp16 scale, so the values a dense (simulated) model holds are exactly what the stored
format decodes to. Codes are unsigned integers in ``[0, 2**bits - 1]``; the zero-point is an
integer on the same range (symmetric grids fix it at ``2**(bits-1)`` and do not store it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from slimbench.config import Config

SCALE_DTYPE = torch.float16


class GridConfig(Config):
    """Parameters of the quantization grid: shared by every weight quantizer."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: int | None = Field(
        None, ge=8, description="input channels per scale/zero group; null = one per output channel"
    )
    symmetric: bool = Field(False, description="symmetric grid (no zero-point stored)")

    @model_validator(mode="after")
    def _power_of_two_group(self):
        if self.group_size is not None and self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two (got {self.group_size})")
        return self


def check_group_size(in_features: dict[str, int], group_size: int | None) -> None:
    """Every layer's input dimension must be a multiple of the group size."""
    if group_size is None:
        return
    bad = {n: d for n, d in in_features.items() if d % group_size}
    if bad:
        name, dim = next(iter(bad.items()))
        fits = [g for g in (2**k for k in range(3, 13)) if all(d % g == 0 for d in in_features.values())]
        raise ValueError(
            f"group_size {group_size} does not divide the input dimension {dim} of layer {name} "
            f"({len(bad)} layers affected); group sizes that divide every layer: {', '.join(map(str, fits)) or 'none'}"
        )


@dataclass
class QuantParams:
    scale: torch.Tensor  # [rows, groups] fp16
    zero: torch.Tensor  # [rows, groups] integer-valued float
    bits: int
    symmetric: bool

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def find_params(w: torch.Tensor, bits: int, symmetric: bool) -> QuantParams:
    """Min-max grid for each row of ``w`` ([rows, n]): one scale/zero per row."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid represents it
    xmin[empty], xmax[empty] = -1.0, 1.0
    scale = ((xmax - xmin) / maxq).to(SCALE_DTYPE).float()
    scale = torch.where(scale == 0, torch.finfo(SCALE_DTYPE).tiny, scale)
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-xmin / scale).clamp(0, maxq)
    return QuantParams(scale.unsqueeze(1), zero.unsqueeze(1), bits, symmetric)


def quantize(w: torch.Tensor, p: QuantParams) -> torch.Tensor:
    """Integer codes of ``w`` on grid ``p`` (``w`` [rows, n], ``p`` per row)."""
    return torch.clamp(torch.round(w.float() / p.scale) + p.zero, 0, p.maxq)


def dequantize(q: torch.Tensor, p: QuantParams) -> torch.Tensor:
    return p.scale * (q - p.zero)


def fake_quantize(w: torch.Tensor, p: QuantParams) -> torch.Tensor:
    return dequantize(quantize(w, p), p)


def grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View [out, in] as [out * groups, group_size] so per-row params become per-group."""
    if group_size is None:
        return w
    return w.reshape(-1, group_size)


def quantize_matrix(w: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
    """RTN of a whole [out, in] matrix: (codes [out, in], dequantized [out, in], params)."""
    g = grouped(w, cfg.group_size)
    p = find_params(g, cfg.bits, cfg.symmetric)
    q = quantize(g, p)
    return q.view_as(w), dequantize(q, p).view_as(w), p


# -- the stored form ------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes < 2**bits into a flat uint8 tensor, ``bits`` bits each, LSB first."""
    flat = codes.reshape(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    bitplane = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-bitplane.numel()) % 8
    bitplane = torch.cat([bitplane, bitplane.new_zeros(pad)]).view(-1, 8)
    return (bitplane << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    bitplane = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bitplane = bitplane.reshape(-1)[: numel * bits].view(numel, bits)
    return (bitplane << torch.arange(bits, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def stored_form(codes: torch.Tensor, p: QuantParams) -> dict[str, torch.Tensor]:
    """Tensors a checkpoint holds for one quantized matrix: packed codes, scales, zero-points."""
    out = {"qweight": pack_bits(codes, p.bits), "scales": p.scale.to(SCALE_DTYPE).reshape(codes.shape[0], -1)}
    if not p.symmetric:  # integer zero-points, packed like the codes
        out["qzeros"] = pack_bits(p.zero.reshape(-1), p.bits)
    return out


def decode_codes(parts: dict[str, torch.Tensor], out_features: int,
                 in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in] uint8, scale [out, groups] f32, zero [out, groups] f32, group of each column [in])
    of a stored form: ``weight = scale[:, cols] * (codes - zero[:, cols])``.

    The form does not hold the bit width: it is the one whose packed size matches the codes
    (unique for any matrix of 8 weights or more). Zero-points are packed integers (``qzeros``),
    fp16 values (``zeros``: HQQ's are not integers) or, for a symmetric grid, ``2**(bits-1)``.
    Columns map to groups through ``g_idx`` where present (act-order), else in runs of
    ``in / groups``. Raises ValueError for a form it cannot read.
    """
    numel = out_features * in_features
    bits = [b for b in range(1, 9) if (numel * b + 7) // 8 == parts["qweight"].numel()]
    if len(bits) != 1:
        n = parts["qweight"].numel()
        raise ValueError(f"packed codes of {n} bytes do not fit a {out_features}x{in_features} matrix")
    b = bits[0]
    scale = parts["scales"].float().reshape(out_features, -1)
    groups = scale.shape[1]
    if "qzeros" in parts:
        zero = unpack_bits(parts["qzeros"], b, scale.numel()).float().view(out_features, groups)
    elif "zeros" in parts:
        zero = parts["zeros"].float().reshape(out_features, groups)
    else:
        zero = torch.full_like(scale, float(2 ** (b - 1)))
    if "g_idx" in parts:
        cols = parts["g_idx"].long()
    elif in_features % groups:
        raise ValueError(f"{groups} groups do not divide {in_features} input channels")
    else:
        cols = torch.arange(in_features) // (in_features // groups)
    codes = unpack_bits(parts["qweight"], b, numel).view(out_features, in_features)
    return codes, scale, zero, cols


def decode_stored_form(parts: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
    """The fp32 [out, in] weight ``scale * (code - zero)`` that :func:`stored_form` stands for
    (see :func:`decode_codes`; extra parts such as AWQ's ``input_scale`` are the caller's business)."""
    codes, scale, zero, cols = decode_codes(parts, out_features, in_features)
    return scale[:, cols] * (codes.float() - zero[:, cols])
