"""What every scoring pruner does once its masks are applied: store, execute, report.

- Storage: the sparse format (bitmask + values, or N:M values + indices) of every pruned layer.
- Execution: ``simulated`` (zeros inside dense matrices) except 2:4 on an Ampere-or-newer CUDA
  GPU in fp16/bf16, where the weights become torch's semi-structured sparse tensors
  (cuSPARSELt/CUTLASS kernels) and execution is ``native``. This machine has no CUDA, so that
  path exists but has not been run here.
"""

from __future__ import annotations

from typing import Any

import torch
from slimbench.methods.pruning.masks import SparsityConfig, summarize_layers
from slimbench.methods.pruning.sparse_format import sparse_storage
from slimbench.methods.quantization.grid import QuantParams

from slimbench.method import MethodReport
from slimbench.modeling import iter_linears


def native_semi_structured_possible(lm: Any, nm: tuple[int, int] | None) -> bool:
    if nm != (2, 4) or lm.device.type != "cuda" or not torch.cuda.is_available():
        return False
    dtype = next(lm.model.parameters()).dtype
    return torch.cuda.get_device_capability(lm.device) >= (8, 0) and dtype in (torch.float16, torch.bfloat16)


def to_semi_structured(lm: Any, names: list[str]) -> None:
    """Swap 2:4-sparse weights for torch's semi-structured sparse tensors (CUDA only; untested here)."""
    from torch.sparse import to_sparse_semi_structured

    mods = dict(iter_linears(lm.model, include_lm_head=True))
    for n in names:
        mod = mods[n]
        if isinstance(mod, torch.nn.Linear):
            mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.data), requires_grad=False)


def pruning_report(
    lm: Any,
    cfg: SparsityConfig,
    stats: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
    quant: dict[str, QuantParams] | None = None,
) -> MethodReport:
    """The MethodReport of a scoring pruner; ``stats`` holds what each layer's mask achieved."""
    names = list(stats)
    storage = sparse_storage(lm.model, names, cfg.nm, quant)
    details = {
        "target_sparsity": cfg.sparsity,
        "pattern": cfg.pattern,
        "stored_format": ("nm_values_indices" if cfg.nm else "bitmask_values") + ("_quantized" if quant else ""),
        **summarize_layers(stats),
        **(extra or {}),
    }
    notes = []
    if native_semi_structured_possible(lm, cfg.nm):
        to_semi_structured(lm, names)
        execution = "native"
        notes.append("2:4 weights held as torch semi-structured sparse tensors (CUDA kernels)")
    else:
        execution = "simulated"
        why = (
            "2:4 sparse kernels need CUDA (Ampere+) in fp16/bf16" if cfg.nm else "unstructured zeros in dense matrices"
        )
        notes.append(f"masks in a dense model ({why}); stored in the sparse format")
    return MethodReport(execution=execution, storage=storage, details=details, notes=notes)
