"""`rtn`: round-to-nearest weight quantization of every linear layer (embeddings and lm_head kept).

``format: fake`` (default) replaces the weights by their dequantized values, so execution is
``simulated`` (dense fp32 matmuls) and the stored form (packed codes, fp16 scales, packed
zero-points) is what the harness counts. ``format: packed`` replaces each layer by a
:class:`~methods.quantization.packed.PackedLinear` executed by a real int8/int4 kernel where
torch has one (``native``), else dequantized on the fly.
"""

from __future__ import annotations

from slimbench.methods.quantization.grid import GridConfig, check_group_size, quantize_matrix
from slimbench.methods.quantization.packed import FormatConfig, finish_layer, format_report

from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears


class RTNConfig(GridConfig, FormatConfig):
    pass


def check(lm, cfg: RTNConfig) -> None:
    check_group_size({n: get_weight(m).shape[1] for n, m in iter_linears(lm.model)}, cfg.group_size)


def apply(lm, cfg: RTNConfig, ctx) -> MethodReport:
    storage = {}
    for name, mod in list(iter_linears(lm.model)):
        codes, _, params = quantize_matrix(get_weight(mod), cfg)
        stored = finish_layer(lm.model, name, codes.view_as(get_weight(mod)), params, cfg.group_size, cfg.format)
        if stored is not None:
            storage[f"{name}.weight"] = stored
    execution, notes, fmt = format_report(lm.model, cfg.format)
    return MethodReport(
        execution=execution,
        storage=storage,
        details={"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                 "layers": len(list(iter_linears(lm.model))), **fmt},
        notes=notes,
    )


METHOD = Method(
    name="rtn",
    family="quantization",
    description="round-to-nearest weight quantization, 2-8 bits, per-channel or grouped, (a)symmetric; fake or packed",
    config=RTNConfig,
    apply=apply,
    check=check,
)
