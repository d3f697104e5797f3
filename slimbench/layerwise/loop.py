"""The layer-wise loop: every compressor gets the reference loop's calls, with known work skipped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimbench.layerwise.adapters import adapter_for, get_path
from slimbench.layerwise.capture import LayerCompressor, capture_layer_inputs, sequential_reference
from slimbench.layerwise.memo import MEMO_BYTES, _LayerRunner
from slimbench.layerwise.variant import variant_settings
from slimbench.modeling import LINEAR_TYPES


@torch.no_grad()
def sequential(
    model: nn.Module,
    calib: torch.Tensor,
    make: Callable[[str, nn.Module], LayerCompressor],
    *,
    true_sequential: bool = True,
    device: torch.device | str = "cpu",
    progress: Callable[..., Any] | None = None,
    memo: bool = True,
    early_stop: bool = True,
    memo_bytes: int = MEMO_BYTES,
    stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run the loop; returns ``{full linear name: what its compressor's compress() returned}``.

    Same calls to every compressor and same layer outputs, bit for bit, as
    :func:`sequential_reference`; ``memo``/``early_stop`` only switch the shortcuts off (for
    measuring them). ``memo_bytes`` caps what one layer's memo holds. ``stats``, if given, is
    filled with counters (memo hits, tail replays, early stops, ...).
    """
    variant = variant_settings()
    if variant.get("reference"):
        return sequential_reference(model, calib, make, true_sequential=true_sequential, device=device,
                                    progress=progress)
    memo, early_stop = variant.get("memo", memo), variant.get("early_stop", early_stop)
    stats = variant.get("stats", stats)
    adapter = adapter_for(model)
    layers = get_path(model, adapter.layers_path)
    captured = capture_layer_inputs(model, layers, calib, device)
    inps = captured.hidden
    results: dict[str, Any] = {}
    counters = {"memo_hits": 0, "tail_replays": 0, "early_stops": 0, "skipped_linears": 0, "memo_full": 0}
    bar = progress(total=len(layers), desc="layers", unit="layer") if progress else None
    for i, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{i}."
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, LINEAR_TYPES)}
        groups = adapter.groups if true_sequential else (tuple(linears),)
        missing = {n for g in groups for n in g} - set(linears)
        if missing:
            raise ValueError(f"layer {i}: adapter {adapter.name} names linears {sorted(missing)} the layer lacks")
        runner = _LayerRunner(layer, captured.for_layer(i), memo=memo, early_stop=early_stop, memo_bytes=memo_bytes,
                              stats=counters)
        try:
            if inps and (memo or early_stop):
                runner.probe(inps[0])
            for group in groups:
                comps = {n: make(prefix + n, linears[n]) for n in group}
                runner.run(inps, {n: linears[n] for n in group}, lambda n, x, y, c=comps: c[n].add_batch(x, y),
                           lambda n, c=comps: getattr(c[n], "needs_output", True))
                for n, comp in comps.items():
                    results[prefix + n] = comp.compress()
            inps = runner.run(inps)  # the compressed layer feeds the next
        finally:
            runner.close()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if stats is not None:
        stats.update(counters)
    return results
