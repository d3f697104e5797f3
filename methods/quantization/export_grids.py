"""The integer grids of a quantized model, for exporters (GGUF, compressed-tensors).

A weight's grid comes from a packed layer (:class:`PackedLinear`: codes, scales, zero-points in
the module) or from the stored form a fake-quant method reported (``MethodReport.storage``:
bit-packed codes, fp16 scales, packed zero-points, act-order ``g_idx``). A grid is used only if
it decodes to exactly the weight the model holds now; a stale form (a later step changed the
weight) or another form (sparse, AWQ's input scale) gives no grid, and the exporter writes that
weight from its dense values, saying so.

W8A8 layers (``w8a8``, ``smoothquant``, ``dynamic-int8``) are int8 weights with per-row scales whose
activations are quantized at run time: :func:`int8_layers` gives them with their activation
scheme, for the formats that express activation quantization (compressed-tensors).
"""

from __future__ import annotations

import torch
from slimbench.methods.quantization.dynamic_int8 import DynamicInt8Linear
from slimbench.methods.quantization.packed import PackedLinear
from slimbench.methods.quantization.w8a8 import W8A8Linear

from slimbench.engines.export.grid import Int8Layer, LinearGrid, grid_from_parts
from slimbench.modeling import get_weight, iter_linears


def grid_of_packed(layer: PackedLinear) -> LinearGrid:
    return LinearGrid(
        codes=layer.codes(), scale=layer.scales.float(), zero=layer.zeros(), cols=layer._column_groups(),
        bits=layer.bits, symmetric=layer.symmetric,
    )


def linear_grids(model, stored_forms: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, LinearGrid]:
    """{weight name: grid} of every linear whose grid is known and decodes to its current weight."""
    stored_forms = stored_forms or {}
    out: dict[str, LinearGrid] = {}
    for name, mod in iter_linears(model, include_lm_head=True):
        key = f"{name}.weight"
        w = get_weight(mod).detach().float()
        if isinstance(mod, PackedLinear):
            grid = grid_of_packed(mod)
        elif key in stored_forms:
            grid = grid_from_parts(stored_forms[key], *w.shape)
        else:
            continue
        if grid is not None and torch.equal(grid.dequantize(), w):
            out[key] = grid
    return out


def int8_layers(model) -> dict[str, Int8Layer]:
    """{weight name: int8 layer} of every W8A8 linear: its int8 codes, per-row scales and how its
    activations are quantized (``torch._int_mm`` layers: symmetric, per token or per tensor;
    fbgemm's ``dynamic-int8``: asymmetric uint8 per tensor, its range reduced to 7 bits)."""
    out: dict[str, Int8Layer] = {}
    for name, mod in iter_linears(model, include_lm_head=True):
        if isinstance(mod, W8A8Linear):
            per = "token" if mod.granularity == "per_token" else "tensor"
            out[f"{name}.weight"] = Int8Layer(mod.qweight, mod.wscale, per, act_symmetric=True)
        elif isinstance(mod, DynamicInt8Linear):
            out[f"{name}.weight"] = Int8Layer(
                mod.qweight, mod.wscale, "tensor", act_symmetric=False,
                note="fbgemm quantizes activations to 7-bit asymmetric uint8; the format's int8 quantizer differs")
    return out
