"""The stored form of a pruned weight, so reported bytes are real bytes.

- Unstructured: a bitmask (1 bit per weight, packed into uint8) plus the non-zero values in
  row-major order, in the weight's own dtype.
- N:M: exactly N values per group of M input channels (``[out, in * N / M]``, zero-padded where
  a group holds fewer non-zeros) plus, per value, its position inside the group in
  ``ceil(log2 M)`` bits (2 bits for 2:4, the metadata NVIDIA's sparse tensor cores read).
- Jointly quantized (SparseGPT with ``bits``): the values are replaced by packed integer codes
  with per-row fp16 scales and packed zero-points (the shared grid's stored form).

Every form also stores the ``[out, in]`` shape and whether the module keeps the weight
transposed (GPT-2's Conv1D), so ``decode`` alone rebuilds the parameter exactly.
"""

from __future__ import annotations

import math

import torch
from slimbench.methods.quantization.grid import SCALE_DTYPE, QuantParams, pack_bits, unpack_bits
from transformers.pytorch_utils import Conv1D

from slimbench.modeling import get_weight, iter_linears, unique_tensors


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _header(w: torch.Tensor, transposed: bool) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor(list(w.shape), dtype=torch.int32),
        "transposed": torch.tensor([int(transposed)], dtype=torch.uint8),
    }


def _encode_values(vals: torch.Tensor, rows: torch.Tensor, quant: QuantParams | None) -> dict[str, torch.Tensor]:
    """Values as they are, or as packed codes on the per-row grid ``quant`` (rows: each value's row)."""
    if quant is None:
        return {"values": vals.contiguous()}
    scale, zero = quant.scale.reshape(-1), quant.zero.reshape(-1)
    codes = torch.clamp(torch.round(vals.float() / scale[rows]) + zero[rows], 0, quant.maxq)
    return {
        "qvalues": pack_bits(codes, quant.bits),
        "scales": scale.to(SCALE_DTYPE),
        "qzeros": pack_bits(zero, quant.bits),
        "bits": torch.tensor([quant.bits], dtype=torch.uint8),
    }


def _decode_values(parts: dict[str, torch.Tensor], rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if "values" in parts:
        return parts["values"]
    bits, n = int(parts["bits"][0]), rows.numel()
    scale = parts["scales"].float()
    zero = unpack_bits(parts["qzeros"], bits, scale.numel()).float()
    codes = unpack_bits(parts["qvalues"], bits, n).float()
    return (scale[rows] * (codes - zero[rows])).to(dtype)


def encode_unstructured(
    w: torch.Tensor, transposed: bool = False, quant: QuantParams | None = None
) -> dict[str, torch.Tensor]:
    """Bitmask + non-zero values of a [out, in] weight."""
    nz = (w != 0).flatten()
    rows = torch.arange(w.shape[0]).repeat_interleave(w.shape[1])[nz]
    return {
        **_header(w, transposed),
        "bitmask": pack_bits(nz.to(torch.uint8), 1),
        **_encode_values(w.flatten()[nz], rows, quant),
    }


def encode_nm(
    w: torch.Tensor, n: int, m: int, transposed: bool = False, quant: QuantParams | None = None
) -> dict[str, torch.Tensor]:
    """N values and their in-group positions per group of M; every group must hold <= N non-zeros."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // m, m)
    nonzero = groups != 0
    if int(nonzero.sum(dim=2).max()) > n:
        raise ValueError(f"weight is not {n}:{m} sparse: a group of {m} holds more than {n} non-zeros")
    # Non-zeros first, then the lowest positions; sorted, so the form is canonical.
    key = nonzero.float() * (2 * m) + (m - torch.arange(m, dtype=torch.float32))
    idx = torch.sort(torch.topk(key, n, dim=2).indices, dim=2).values
    vals = torch.gather(groups, 2, idx).reshape(rows, -1)
    row_of = torch.arange(rows).repeat_interleave(vals.shape[1])
    return {
        **_header(w, transposed),
        "nm": torch.tensor([n, m], dtype=torch.int32),
        "indices": pack_bits(idx.flatten(), index_bits(m)),
        **_encode_values(vals.flatten() if quant is not None else vals, row_of, quant),
    }


def decode(parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [out, in] weight a stored form stands for (exactly the values encoded)."""
    rows, cols = (int(s) for s in parts["shape"])
    if "nm" in parts:
        n, m = (int(s) for s in parts["nm"])
        k = rows * cols // m * n
        idx = unpack_bits(parts["indices"], index_bits(m), k).long().view(rows, cols // m, n)
        vals = _decode_values(parts, torch.arange(rows).repeat_interleave(k // rows), dtype).reshape(rows, cols // m, n)
        out = torch.zeros(rows, cols // m, m, dtype=vals.dtype)
        out.scatter_(2, idx, vals)
        return out.view(rows, cols)
    nz = unpack_bits(parts["bitmask"], 1, rows * cols).bool()
    row_of = torch.arange(rows).repeat_interleave(cols)[nz]
    vals = _decode_values(parts, row_of, dtype)
    out = torch.zeros(rows * cols, dtype=vals.dtype)
    out[nz] = vals
    return out.view(rows, cols)


def decode_param(parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The parameter in the module's own layout (Conv1D keeps [in, out])."""
    w = decode(parts, dtype)
    return w.t().contiguous() if int(parts["transposed"][0]) else w


def encode_module(
    mod: torch.nn.Module, nm: tuple[int, int] | None, quant: QuantParams | None = None
) -> dict[str, torch.Tensor]:
    w, transposed = get_weight(mod), isinstance(mod, Conv1D)
    return encode_nm(w, *nm, transposed, quant) if nm else encode_unstructured(w, transposed, quant)


def sparse_storage(
    model: torch.nn.Module,
    names: list[str],
    nm: tuple[int, int] | None,
    quant: dict[str, QuantParams] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<linear>.weight": stored form}`` for the named linear layers, as MethodReport.storage wants."""
    mods = dict(iter_linears(model, include_lm_head=True))
    # A tied lm_head shares the embedding's tensor: key it by the name the checkpoint keeps.
    key_of = {t.untyped_storage().data_ptr(): k for k, t in unique_tensors(model).items()}
    return {
        key_of[mods[n].weight.untyped_storage().data_ptr()]: encode_module(mods[n], nm, (quant or {}).get(n))
        for n in names
    }


def load_storage(model: torch.nn.Module, storage: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write decoded weights back into a model of the same shape (what reloading a checkpoint does)."""
    params = model.state_dict(keep_vars=True)
    for key, parts in storage.items():
        p = params[key]
        p.data.copy_(decode_param(parts, p.dtype))
