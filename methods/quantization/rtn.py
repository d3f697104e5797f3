"""`rtn`: round-to-nearest weight quantization of every linear layer (embeddings and lm_head kept).

The weights are replaced in place by their dequantized values (fake-quant), so execution is
``simulated``: the model runs dense fp32 matmuls. The stored form (packed codes, fp16 scales,
packed zero-points) is what the harness counts as the compressed model's bytes.
"""

from __future__ import annotations

from methods.quantization.grid import GridConfig, check_group_size, quantize_matrix, stored_form
from slimbench.method import Method, MethodReport
from slimbench.modeling import get_weight, iter_linears, set_weight


class RTNConfig(GridConfig):
    pass


def check(lm, cfg: RTNConfig) -> None:
    check_group_size({n: get_weight(m).shape[1] for n, m in iter_linears(lm.model)}, cfg.group_size)


def apply(lm, cfg: RTNConfig, ctx) -> MethodReport:
    storage = {}
    for name, mod in iter_linears(lm.model):
        codes, deq, params = quantize_matrix(get_weight(mod), cfg)
        set_weight(mod, deq)
        storage[f"{name}.weight"] = stored_form(codes, params)
    return MethodReport(
        execution="simulated",
        storage=storage,
        details={"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric, "layers": len(storage)},
        notes=["fake-quant: dequantized weights in a dense model"],
    )


METHOD = Method(
    name="rtn",
    family="quantization",
    description="round-to-nearest weight quantization, 2-8 bits, per-channel or grouped, (a)symmetric",
    config=RTNConfig,
    apply=apply,
    check=check,
)
