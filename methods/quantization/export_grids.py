"""The integer grids of a quantized model, for exporters (GGUF, compressed-tensors).

A weight's grid comes from a packed layer (:class:`PackedLinear`: codes, scales, zero-points in
the module) or from the stored form a fake-quant method reported (``MethodReport.storage``:
bit-packed codes, fp16 scales, packed zero-points, act-order ``g_idx``). A grid is used only if
it decodes to exactly the weight the model holds now; a stale form (a later step changed the
weight) or another form (sparse, AWQ's input scale) gives no grid, and the exporter writes that
weight from its dense values, saying so.
"""

from __future__ import annotations

import torch
from slimbench.methods.quantization.packed import PackedLinear

from slimbench.engines.export.grid import LinearGrid, grid_from_parts
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
